//! The chain of layers being built from the graph's nodes, in order: each
//! node either starts a layer (Gemm, MatMul), is folded into the layer where
//! it stands (a per-feature affine: Add/Sub/Mul/Div by a constant,
//! BatchNormalization, Scaler), sets its layer norm or activation, or sets the
//! output transform. Every refusal names the node and its op type.

use super::network::{node_label, Layer, Network, NOOPS, SUPPORTED_OPS};
use super::proto::{NodeProto, TensorProto};
use crate::model::{Activation, OutputTransform};
use std::collections::HashMap;

/// Where the tensor flowing through the chain stands relative to the last layer.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Stage {
    /// The graph input, or an activated output: a per-feature affine here
    /// is folded into the *next* layer's weights.
    Between,
    /// `x @ W (+ b)`: an affine folds into W and b.
    Linear,
    /// After the layer norm: an affine folds into gamma and beta.
    Normed,
    /// After the activation.
    Activated,
    /// After the output transform (Softmax, or a final Sigmoid): only no-ops may follow.
    Done,
}

pub(super) struct Builder<'a> {
    pub(super) consts: &'a HashMap<&'a str, &'a TensorProto>,
    /// Features of the tensor flowing through the chain, once known.
    pub(super) width: Option<usize>,
    pub(super) layers: Vec<Layer>,
    /// A per-feature `x * a + c` waiting to be folded into the next layer.
    pub(super) pending: Option<(Vec<f32>, Vec<f32>)>,
    pub(super) stage: Stage,
    pub(super) eps: Option<f32>,
    pub(super) output: OutputTransform,
    pub(super) opset: i64,
    /// The affine folded into the first layer (a scaler), if any.
    pub(super) input_affine: Option<(Vec<f32>, Vec<f32>)>,
}

impl<'a> Builder<'a> {
    fn konst(&self, n: &NodeProto, i: usize) -> Result<Option<&'a TensorProto>, String> {
        let Some(name) = n.inputs.get(i).filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let t = self.consts.get(name.as_str()).copied();
        if let Some(t) = t {
            if t.values.len() as u64 != t.numel() {
                return Err(format!(
                    "{}: input {name:?} has data type {}; only float (and integer) tensors are supported",
                    node_label(n),
                    t.data_type
                ));
            }
        }
        Ok(t)
    }

    fn need_konst(&self, n: &NodeProto, i: usize, what: &str) -> Result<&'a TensorProto, String> {
        self.konst(n, i)?.ok_or_else(|| {
            format!(
                "{}: its {what} (input {i}) must be a constant (an initializer)",
                node_label(n)
            )
        })
    }

    /// A per-feature vector from a tensor of shape [], [1], [w] or [1, w].
    fn per_feature(&self, n: &NodeProto, t: &TensorProto, what: &str) -> Result<Vec<f32>, String> {
        let w = self.width;
        let flat = t.dims.iter().filter(|&&d| d != 1).count() <= 1;
        let len = t.values.len();
        if !flat || t.dims.len() > 2 || (len != 1 && w.is_some_and(|w| w != len)) {
            return Err(format!(
                "{}: {what} {:?} has shape {:?}; expected a scalar or one value per feature{}",
                node_label(n),
                t.name,
                t.dims,
                w.map_or(String::new(), |w| format!(" ([{w}] or [1, {w}])"))
            ));
        }
        match w {
            Some(w) if len == 1 => Ok(vec![t.values[0]; w]),
            Some(_) => Ok(t.values.clone()),
            None if len == 1 => Err(format!(
                "{}: a scalar {what} before the width of the input is known; give the graph input a fixed feature dim",
                node_label(n)
            )),
            None => Ok(t.values.clone()),
        }
    }

    pub(super) fn node(&mut self, n: &NodeProto) -> Result<(), String> {
        if self.stage == Stage::Done && !NOOPS.contains(&n.op_type.as_str()) {
            return Err(format!(
                "{}: only Identity/Dropout may follow the output Softmax or Sigmoid",
                node_label(n)
            ));
        }
        match n.op_type.as_str() {
            "Identity" | "Flatten" => Ok(()),
            "Dropout" => {
                if n.outputs.len() > 1 && !n.outputs[1].is_empty() {
                    return Err(format!(
                        "{}: its mask output is used; not supported",
                        node_label(n)
                    ));
                }
                Ok(())
            }
            "Cast" => match n.attr_i("to") {
                Some(1) => Ok(()),
                to => Err(format!(
                    "{}: casts to type {to:?}; only a cast to float (1) is supported",
                    node_label(n)
                )),
            },
            "Gemm" => {
                if n.attr_i("transA").unwrap_or(0) != 0 {
                    return Err(format!(
                        "{}: transA=1 (a transposed data input) is not supported",
                        node_label(n)
                    ));
                }
                let b = self.need_konst(n, 1, "weight B")?;
                let trans_b = n.attr_i("transB").unwrap_or(0) != 0;
                let alpha = n.attr_f("alpha").unwrap_or(1.0);
                let beta = n.attr_f("beta").unwrap_or(1.0);
                let (w, in_dim, out_dim) = self.weight(n, b, trans_b, alpha)?;
                let bias = match self.konst(n, 2)? {
                    Some(c) => {
                        let saved = self.width.replace(out_dim);
                        let v = self.per_feature(n, c, "bias C");
                        self.width = saved;
                        v?.into_iter().map(|x| x * beta).collect()
                    }
                    None if n.inputs.len() > 2 && !n.inputs[2].is_empty() => {
                        return Err(format!("{}: its bias C must be a constant", node_label(n)))
                    }
                    None => vec![0.0; out_dim],
                };
                self.push_layer(w, in_dim, out_dim, bias);
                Ok(())
            }
            "MatMul" => {
                if n.inputs
                    .first()
                    .is_some_and(|i| self.consts.contains_key(i.as_str()))
                {
                    return Err(format!(
                        "{}: the constant must be the second operand (x @ W)",
                        node_label(n)
                    ));
                }
                let b = self.need_konst(n, 1, "weight")?;
                let (w, in_dim, out_dim) = self.weight(n, b, false, 1.0)?;
                self.push_layer(w, in_dim, out_dim, vec![0.0; out_dim]);
                Ok(())
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let ci = n
                    .inputs
                    .iter()
                    .position(|i| self.consts.contains_key(i.as_str()))
                    .ok_or_else(|| format!("{}: needs a constant operand", node_label(n)))?;
                let t = self.consts[n.inputs[ci].as_str()];
                let v = self.per_feature(n, t, "operand")?;
                let width = v.len();
                let (a, c) = match (n.op_type.as_str(), ci) {
                    ("Add", _) => (vec![1.0; width], v),
                    ("Sub", 1) => (vec![1.0; width], v.iter().map(|x| -x).collect()),
                    ("Sub", _) => (vec![-1.0; width], v),
                    ("Mul", _) => (v, vec![0.0; width]),
                    ("Div", 1) => (v.iter().map(|x| 1.0 / x).collect(), vec![0.0; width]),
                    _ => {
                        return Err(format!(
                            "{}: a constant divided by the data is not supported",
                            node_label(n)
                        ))
                    }
                };
                self.affine(n, a, c)
            }
            "BatchNormalization" => {
                if n.attr_i("training_mode").unwrap_or(0) != 0 {
                    return Err(format!(
                        "{}: training_mode=1 is not supported",
                        node_label(n)
                    ));
                }
                if n.outputs.iter().skip(1).any(|o| !o.is_empty()) {
                    return Err(format!(
                        "{}: its running statistics outputs are used; not supported",
                        node_label(n)
                    ));
                }
                let eps = n.attr_f("epsilon").unwrap_or(1e-5);
                let mut p = Vec::new();
                for (i, what) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
                    let t = self.need_konst(n, i, what)?;
                    p.push(self.per_feature(n, t, what)?);
                }
                let a: Vec<f32> = p[0]
                    .iter()
                    .zip(&p[3])
                    .map(|(g, v)| g / (v + eps).sqrt())
                    .collect();
                let c = p[1]
                    .iter()
                    .zip(&p[2])
                    .zip(&a)
                    .map(|((b, m), a)| b - m * a)
                    .collect();
                self.affine(n, a, c)
            }
            "Scaler" => {
                // ai.onnx.ml Scaler: y = (x - offset) * scale (skl2onnx's StandardScaler).
                let get = |k: &str| n.attr(k).map(|a| a.floats.clone()).unwrap_or_default();
                let (off, sc) = (get("offset"), get("scale"));
                let w = self
                    .width
                    .or((off.len() > 1).then_some(off.len()))
                    .or((sc.len() > 1).then_some(sc.len()));
                let Some(w) = w else {
                    return Err(format!("{}: the input width is unknown", node_label(n)));
                };
                let widen = |v: Vec<f32>, d: f32| -> Option<Vec<f32>> {
                    match v.len() {
                        0 => Some(vec![d; w]),
                        1 => Some(vec![v[0]; w]),
                        l if l == w => Some(v),
                        _ => None,
                    }
                };
                let (Some(off), Some(sc)) = (widen(off, 0.0), widen(sc, 1.0)) else {
                    return Err(format!(
                        "{}: offset/scale do not match the {w} features",
                        node_label(n)
                    ));
                };
                self.width = Some(w);
                let c = off.iter().zip(&sc).map(|(o, s)| -o * s).collect();
                self.affine(n, sc, c)
            }
            "LayerNormalization" => {
                let axis = n.attr_i("axis").unwrap_or(-1);
                if axis != -1 && axis != 1 {
                    return Err(format!(
                        "{}: axis {axis}; only the last axis is supported",
                        node_label(n)
                    ));
                }
                if self.stage != Stage::Linear {
                    return Err(format!(
                        "{}: a layer norm must directly follow a Gemm or MatMul (+ Add)",
                        node_label(n)
                    ));
                }
                let eps = n.attr_f("epsilon").unwrap_or(1e-5);
                if self.eps.is_some_and(|e| e != eps) {
                    return Err(format!(
                        "{}: epsilon {eps:e} differs from an earlier layer norm's {:e}; beast uses one per model",
                        node_label(n),
                        self.eps.unwrap()
                    ));
                }
                if eps.is_nan() || eps <= 0.0 {
                    return Err(format!("{}: epsilon must be > 0", node_label(n)));
                }
                self.eps = Some(eps);
                let g = self.need_konst(n, 1, "scale")?;
                let g = self.per_feature(n, g, "scale")?;
                let beta = match self.konst(n, 2)? {
                    Some(t) => self.per_feature(n, t, "bias")?,
                    None => vec![0.0; g.len()],
                };
                self.layers.last_mut().unwrap().layer_norm = Some((g, beta));
                self.stage = Stage::Normed;
                Ok(())
            }
            "Relu" | "Tanh" | "Sigmoid" | "Gelu" => {
                let act = match n.op_type.as_str() {
                    "Relu" => Activation::Relu,
                    "Tanh" => Activation::Tanh,
                    "Sigmoid" => Activation::Sigmoid,
                    _ => match n.attr_s("approximate").as_deref() {
                        Some("tanh") => Activation::Gelu,
                        other => {
                            return Err(format!(
                                "{}: approximate={:?}: beast computes GELU with the tanh approximation only; \
                                 export with approximate=\"tanh\" (PyTorch: nn.GELU(approximate=\"tanh\"))",
                                node_label(n),
                                other.unwrap_or("none")
                            ))
                        }
                    },
                };
                if !matches!(self.stage, Stage::Linear | Stage::Normed) {
                    return Err(format!(
                        "{}: an activation must follow a Gemm or MatMul (+ Add, LayerNormalization); \
                         here it follows {}",
                        node_label(n),
                        match self.stage {
                            Stage::Between => "the input",
                            _ => "another activation",
                        }
                    ));
                }
                self.layers.last_mut().unwrap().activation = act;
                self.stage = Stage::Activated;
                Ok(())
            }
            "Softmax" => {
                let default_axis = if self.opset >= 13 { -1 } else { 1 };
                let axis = n.attr_i("axis").unwrap_or(default_axis);
                if axis != -1 && axis != 1 {
                    return Err(format!(
                        "{}: axis {axis}; only the feature axis is supported",
                        node_label(n)
                    ));
                }
                if self.layers.is_empty() || self.pending.is_some() || self.stage == Stage::Between
                {
                    return Err(format!(
                        "{}: Softmax must follow the last layer (Gemm or MatMul, + Add, norm, activation)",
                        node_label(n)
                    ));
                }
                self.output = OutputTransform::Softmax;
                self.stage = Stage::Done;
                Ok(())
            }
            "Reshape" => {
                // Only the no-op reshape [-1 or 0, width] (skl2onnx ends regressors with one).
                let t = self.need_konst(n, 1, "shape")?;
                let w = self.width.map_or(-2.0, |w| w as f32);
                let ok = t.values.len() == 2
                    && matches!(t.values[0], -1.0 | 0.0)
                    && (t.values[1] == w || t.values[1] == -1.0 && t.values[0] == 0.0);
                if !ok {
                    return Err(format!(
                        "{}: reshapes to {:?}; only [-1, {}] (no change) is supported",
                        node_label(n),
                        t.values,
                        self.width.map_or("width".into(), |w| w.to_string())
                    ));
                }
                Ok(())
            }
            "Concat" => Err(format!(
                "{}: only the binary classifier tail Sigmoid → Sub(1, p) → Concat is supported",
                node_label(n)
            )),
            _ => Err(format!(
                "{}: op not supported{SUPPORTED_OPS}",
                node_label(n)
            )),
        }
    }

    /// `alpha * B` (or its transpose) as `[in, out]`, checked against the width.
    fn weight(
        &self,
        n: &NodeProto,
        b: &TensorProto,
        trans: bool,
        alpha: f32,
    ) -> Result<(Vec<f32>, usize, usize), String> {
        if b.dims.len() != 2 || b.dims.contains(&0) {
            return Err(format!(
                "{}: weight {:?} has shape {:?}; expected a 2-D matrix",
                node_label(n),
                b.name,
                b.dims
            ));
        }
        let (r, c) = (b.dims[0] as usize, b.dims[1] as usize);
        let (in_dim, out_dim) = if trans { (c, r) } else { (r, c) };
        if let Some(w) = self.width {
            if w != in_dim {
                return Err(format!(
                    "{}: weight {:?} has shape {:?}{}: it takes {in_dim} features, the data has {w}",
                    node_label(n),
                    b.name,
                    b.dims,
                    if trans { " (transB=1)" } else { "" }
                ));
            }
        }
        let mut w = vec![0f32; in_dim * out_dim];
        for i in 0..in_dim {
            for o in 0..out_dim {
                let v = if trans {
                    b.values[o * c + i]
                } else {
                    b.values[i * c + o]
                };
                w[i * out_dim + o] = alpha * v;
            }
        }
        Ok((w, in_dim, out_dim))
    }

    fn push_layer(&mut self, mut w: Vec<f32>, in_dim: usize, out_dim: usize, mut bias: Vec<f32>) {
        // An affine waiting before this layer: (x*a + c) @ W + b = x @ (diag(a) W) + (c @ W + b).
        if let Some((a, c)) = self.pending.take() {
            if self.layers.is_empty() {
                self.input_affine = Some((a.clone(), c.clone()));
            }
            for i in 0..in_dim {
                for o in 0..out_dim {
                    bias[o] += c[i] * w[i * out_dim + o];
                    w[i * out_dim + o] *= a[i];
                }
            }
        }
        self.layers.push(Layer {
            in_dim,
            out_dim,
            weight: w,
            bias,
            layer_norm: None,
            activation: Activation::Identity,
        });
        self.width = Some(out_dim);
        self.stage = Stage::Linear;
    }

    /// Fold `y = x * a + c` (per feature) where it stands.
    fn affine(&mut self, n: &NodeProto, a: Vec<f32>, c: Vec<f32>) -> Result<(), String> {
        if a.iter().chain(&c).any(|x| !x.is_finite()) {
            return Err(format!(
                "{}: folds to a non-finite scale or shift (a zero variance or divisor?)",
                node_label(n)
            ));
        }
        self.width = Some(a.len());
        match self.stage {
            Stage::Between => {
                self.pending = Some(match self.pending.take() {
                    None => (a, c),
                    // (x*a0 + c0)*a + c
                    Some((a0, c0)) => (
                        a0.iter().zip(&a).map(|(x, y)| x * y).collect(),
                        c0.iter()
                            .zip(&a)
                            .zip(&c)
                            .map(|((c0, a), c)| c0 * a + c)
                            .collect(),
                    ),
                });
            }
            Stage::Linear => {
                let l = self.layers.last_mut().unwrap();
                for (i, w) in l.weight.iter_mut().enumerate() {
                    *w *= a[i % l.out_dim];
                }
                for ((b, a), c) in l.bias.iter_mut().zip(&a).zip(&c) {
                    *b = *b * a + c;
                }
            }
            Stage::Normed => {
                let (g, beta) = self.layers.last_mut().unwrap().layer_norm.as_mut().unwrap();
                for ((g, b), (a, c)) in g.iter_mut().zip(beta.iter_mut()).zip(a.iter().zip(&c)) {
                    *g *= a;
                    *b = *b * a + c;
                }
            }
            Stage::Activated => {
                // Folded into the next layer; at the end there is none.
                self.stage = Stage::Between;
                return self.affine(n, a, c);
            }
            Stage::Done => unreachable!("checked in node()"),
        }
        Ok(())
    }

    /// Turn the last layer `z` (one column) into the two columns `[0, z]`
    /// (or `[z, 0]`) under Softmax: Softmax([0, z]) = [1 - σ(z), σ(z)].
    pub(super) fn two_class(&mut self, p_col: usize) -> Result<(), String> {
        let ok = self.stage == Stage::Linear && self.layers.last().is_some_and(|l| l.out_dim == 1);
        if !ok {
            return Err(
                "the binary classifier tail Sigmoid → Sub → Concat must follow a layer with one output and no layer norm"
                    .into(),
            );
        }
        let l = self.layers.last_mut().unwrap();
        let mut w = vec![0f32; l.in_dim * 2];
        for i in 0..l.in_dim {
            w[i * 2 + p_col] = l.weight[i];
        }
        l.weight = w;
        l.bias = if p_col == 1 {
            vec![0.0, l.bias[0]]
        } else {
            vec![l.bias[0], 0.0]
        };
        l.out_dim = 2;
        self.output = OutputTransform::Softmax;
        self.stage = Stage::Done;
        Ok(())
    }

    pub(super) fn finish(
        mut self,
        input_name: String,
        output_name: String,
        mut notes: Vec<String>,
    ) -> Result<Network, String> {
        if self.layers.is_empty() {
            return Err("the graph has no Gemm or MatMul layer".into());
        }
        if self.pending.is_some() {
            return Err("a per-feature scale or shift after the last activation cannot be folded into a layer".into());
        }
        // A final Sigmoid is the output transform (same numbers, and what
        // the rest of beast reads as a probability).
        let last = self.layers.last_mut().unwrap();
        if self.stage == Stage::Activated
            && last.activation == Activation::Sigmoid
            && last.layer_norm.is_none()
        {
            last.activation = Activation::Identity;
            self.output = OutputTransform::Sigmoid;
        }
        if self.output == OutputTransform::Softmax && self.layers.last().unwrap().out_dim == 2 {
            notes.push("two-class classifier: column 1 is p(class 1)".into());
        }
        let input_width = self.layers[0].in_dim;
        Ok(Network {
            input_width,
            layers: self.layers,
            layer_norm_eps: self.eps,
            output: self.output,
            input_affine: self.input_affine,
            input_name,
            output_name,
            notes,
        })
    }
}
