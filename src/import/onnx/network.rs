//! What the ONNX import produces (`Network`, `Layer`) and the names both
//! its steps use: `convert.rs` (the graph walk) and `builder.rs` (the layer
//! stack) import this file and never each other in a circle.

use super::proto::NodeProto;
use crate::model::{Activation, OutputTransform};

/// One dense layer in f32: `weight` is `[in, out]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub in_dim: usize,
    pub out_dim: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub layer_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub activation: Activation,
}

/// The imported network.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub input_width: usize,
    pub layers: Vec<Layer>,
    /// Epsilon shared by every layer norm (beast has one per model).
    pub layer_norm_eps: Option<f32>,
    pub output: OutputTransform,
    /// `x * a + c` per input feature that was folded into the first layer
    /// (a StandardScaler, an input BatchNormalization), if any.
    pub input_affine: Option<(Vec<f32>, Vec<f32>)>,
    /// Names of the graph input and of the output that was imported.
    pub input_name: String,
    pub output_name: String,
    /// Things the user should know (which output was picked, a pattern
    /// that was rewritten), one line each.
    pub notes: Vec<String>,
}

pub(super) fn node_label(n: &NodeProto) -> String {
    let name = if n.name.is_empty() {
        n.outputs.first().map(String::as_str).unwrap_or("?")
    } else {
        &n.name
    };
    format!("node {name:?} ({})", n.op_type)
}

pub(super) const NOOPS: [&str; 5] = ["Identity", "Dropout", "Cast", "Flatten", "Reshape"];

pub(super) const SUPPORTED_OPS: &str = " (supported: Gemm, MatMul, Add, Sub, Mul, Div, Relu, Tanh, Sigmoid, \
     Gelu with approximate=\"tanh\", LayerNormalization, BatchNormalization, Softmax (last), \
     Flatten, Identity, Dropout, Cast to float, Constant, Reshape to [-1, width], Scaler; see docs/MODELS.md)";
