//! An ONNX graph → the layers of a beast MLP (`act(LN(x @ W + b))` per
//! layer, then the output transform), in f32. What is accepted and how it is
//! folded is in docs/MODELS.md ("Importing ONNX"); anything else is refused
//! naming the node and its op type.

use super::builder::{Builder, Stage};
use super::network::{node_label, NOOPS, SUPPORTED_OPS};
pub use super::network::{Layer, Network};
use super::proto::{GraphProto, ModelProto, NodeProto, TensorProto, DT_DOUBLE, DT_FLOAT};
use crate::model::OutputTransform;
use std::collections::{HashMap, HashSet};

/// Import the graph of `m`. `output`: the graph output to import (needed
/// only when more than one can be imported).
pub fn convert(m: &ModelProto, output: Option<&str>) -> Result<Network, String> {
    if m.has_functions {
        return Err("the model defines local functions; not supported".into());
    }
    let g = &m.graph;
    if g.has_sparse_initializers {
        return Err("the graph has sparse initializers; not supported".into());
    }
    let opset = m
        .opset_import
        .iter()
        .find(|(d, _)| d.is_empty() || d == "ai.onnx")
        .map_or(1, |(_, v)| *v);
    let mut consts: HashMap<&str, &TensorProto> = HashMap::new();
    for t in &g.initializers {
        if t.external {
            return Err(format!(
                "initializer {:?} is stored outside the .onnx file (external data); \
                 save the model with its weights inside (onnx.save_model(m, path, save_as_external_data=False))",
                t.name
            ));
        }
        consts.insert(&t.name, t);
    }
    // Constant nodes, and Identity of a constant (PyTorch writes those for
    // shared BatchNorm statistics), are constants too.
    for n in &g.nodes {
        let out = n.outputs.first().map(String::as_str).unwrap_or("");
        if n.op_type == "Constant" && n.domain.is_empty() {
            match n.attr("value").and_then(|a| a.t.as_ref()) {
                Some(t) if !t.external => {
                    consts.insert(out, t);
                }
                _ => {
                    return Err(format!(
                        "{}: only a tensor `value` is supported",
                        node_label(n)
                    ))
                }
            }
        } else if n.op_type == "Identity" && n.inputs.len() == 1 {
            if let Some(t) = consts.get(n.inputs[0].as_str()).copied() {
                consts.insert(out, t);
            }
        }
    }
    let data_inputs: Vec<_> = g
        .inputs
        .iter()
        .filter(|i| !consts.contains_key(i.name.as_str()))
        .collect();
    let input = match data_inputs.as_slice() {
        [one] => *one,
        [] => return Err("the graph has no input".into()),
        many => {
            return Err(format!(
                "the graph has {} inputs ({}); beast models take one row of features",
                many.len(),
                many.iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    if input.elem_type != DT_FLOAT && input.elem_type != DT_DOUBLE {
        return Err(format!(
            "graph input {:?} has element type {}; only float tensors are supported",
            input.name, input.elem_type
        ));
    }
    let producer: HashMap<&str, &NodeProto> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n)))
        .collect();

    // Which output: the requested one, or the only one whose nodes are all supported.
    let (out_name, slice) = match output {
        Some(o) => {
            if !g.outputs.iter().any(|v| v.name == o) {
                return Err(format!(
                    "no graph output named {o:?} (outputs: {})",
                    output_names(g)
                ));
            }
            (
                o.to_string(),
                backward_slice(o, &producer, &consts, &input.name),
            )
        }
        None => {
            let mut ok = Vec::new();
            let mut first_err = None;
            for o in &g.outputs {
                let s = backward_slice(&o.name, &producer, &consts, &input.name);
                match g
                    .nodes
                    .iter()
                    .find(|&n| s.contains(&(n as *const NodeProto)) && !supported(n))
                {
                    None => ok.push((o.name.clone(), s)),
                    Some(n) => {
                        first_err.get_or_insert(format!("{}: op not supported", node_label(n)));
                    }
                }
            }
            match ok.len() {
                1 => ok.pop().unwrap(),
                0 => {
                    return Err(first_err.unwrap_or_else(|| "the graph has no output".into()) + SUPPORTED_OPS)
                }
                _ => {
                    return Err(format!(
                        "the graph has {} outputs that could be imported ({}); choose one with --output",
                        ok.len(),
                        ok.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                }
            }
        }
    };
    let mut nodes: Vec<&NodeProto> = g
        .nodes
        .iter()
        .filter(|&n| slice.contains(&(n as *const NodeProto)))
        // Constants (and Identity of a constant) are not part of the chain.
        .filter(|n| {
            !n.outputs
                .first()
                .is_some_and(|o| consts.contains_key(o.as_str()))
        })
        .collect();
    if let Some(n) = nodes.iter().find(|n| !supported(n)) {
        return Err(format!(
            "{}: op not supported{SUPPORTED_OPS}",
            node_label(n)
        ));
    }
    let mut notes = Vec::new();
    if g.outputs.len() > 1 {
        notes.push(format!(
            "imported graph output {out_name:?} (of {})",
            output_names(g)
        ));
    }
    // scikit-learn's binary classifiers end in p = Sigmoid(z), Concat(1 - p, p):
    // that is exactly Softmax([0, z]), which beast runs as two classes.
    let binary = strip_binary_tail(&mut nodes, &consts);
    let mut b = Builder {
        consts: &consts,
        width: None,
        layers: Vec::new(),
        pending: None,
        stage: Stage::Between,
        eps: None,
        output: OutputTransform::Identity,
        opset,
        input_affine: None,
    };
    if let Some(shape) = &input.shape {
        if shape.len() < 2 {
            return Err(format!(
                "graph input {:?} has rank {}; expected [batch, features]",
                input.name,
                shape.len()
            ));
        }
        if shape.len() == 2 {
            b.width = shape[1].filter(|&d| d > 0).map(|d| d as usize);
        }
    }
    let mut cur = input.name.clone();
    let mut rank = input.shape.as_ref().map_or(2, |s| s.len());
    for n in &nodes {
        let data: Vec<&String> = n
            .inputs
            .iter()
            .filter(|i| !i.is_empty() && !consts.contains_key(i.as_str()))
            .collect();
        if data.len() != 1 || *data[0] != cur {
            return Err(format!(
                "{}: takes {} as its data input{}; only a chain of layers is supported",
                node_label(n),
                data.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if data.len() == 1 {
                    format!(", not the chain's {cur:?}")
                } else {
                    String::new()
                }
            ));
        }
        if rank > 2 && n.op_type != "Flatten" && !NOOPS.contains(&n.op_type.as_str()) {
            return Err(format!(
                "{}: the input has rank {rank}; only a Flatten may come before the first layer",
                node_label(n)
            ));
        }
        if n.op_type == "Flatten" {
            if rank > 2 {
                let shape = input.shape.as_ref().unwrap();
                if n.attr_i("axis").unwrap_or(1) != 1
                    || shape[1..].iter().any(|d| d.is_none_or(|d| d <= 0))
                {
                    return Err(format!(
                        "{}: only axis 1 of an input with fixed feature dims is supported",
                        node_label(n)
                    ));
                }
                b.width = Some(shape[1..].iter().map(|d| d.unwrap() as usize).product());
                rank = 2;
            }
        } else {
            b.node(n)?;
        }
        cur = n.outputs[0].clone();
    }
    if let Some(order) = binary {
        b.two_class(order)?;
    }
    b.finish(input.name.clone(), out_name, notes)
}

fn supported(n: &NodeProto) -> bool {
    let ml = n.domain == "ai.onnx.ml";
    (n.domain.is_empty() || n.domain == "ai.onnx")
        && matches!(
            n.op_type.as_str(),
            "Gemm"
                | "MatMul"
                | "Add"
                | "Sub"
                | "Mul"
                | "Div"
                | "Relu"
                | "Tanh"
                | "Sigmoid"
                | "Gelu"
                | "LayerNormalization"
                | "BatchNormalization"
                | "Softmax"
                | "Flatten"
                | "Identity"
                | "Dropout"
                | "Cast"
                | "Concat"
                | "Reshape"
                | "Constant"
        )
        || ml && n.op_type == "Scaler"
}

fn output_names(g: &GraphProto) -> String {
    g.outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nodes `out` depends on, stopping at constants and the graph input.
fn backward_slice(
    out: &str,
    producer: &HashMap<&str, &NodeProto>,
    consts: &HashMap<&str, &TensorProto>,
    input: &str,
) -> HashSet<*const NodeProto> {
    let mut seen = HashSet::new();
    let mut stack = vec![out];
    while let Some(t) = stack.pop() {
        if t == input || consts.contains_key(t) {
            continue;
        }
        if let Some(&n) = producer.get(t) {
            if seen.insert(n as *const NodeProto) {
                stack.extend(
                    n.inputs
                        .iter()
                        .map(String::as_str)
                        .filter(|s| !s.is_empty()),
                );
            }
        }
    }
    seen
}

/// Recognise `p = Sigmoid(z); q = Sub(1, p); Concat(q, p)` (or `(p, q)`) at
/// the end; remove the three nodes and say which column p is in.
fn strip_binary_tail(
    nodes: &mut Vec<&NodeProto>,
    consts: &HashMap<&str, &TensorProto>,
) -> Option<usize> {
    let k = nodes.len();
    if k < 3 {
        return None;
    }
    let (sig, sub, cat) = (nodes[k - 3], nodes[k - 2], nodes[k - 1]);
    let p = sig.outputs.first()?;
    let q = sub.outputs.first()?;
    let one = consts.get(sub.inputs.first()?.as_str())?;
    let ok = sig.op_type == "Sigmoid"
        && sub.op_type == "Sub"
        && sub.inputs.get(1) == Some(p)
        && one.values.len() == 1
        && one.values[0] == 1.0
        && cat.op_type == "Concat"
        && matches!(cat.attr_i("axis"), Some(1) | Some(-1))
        && cat.inputs.len() == 2;
    if !ok {
        return None;
    }
    let order = if cat.inputs[0] == *q && cat.inputs[1] == *p {
        1
    } else if cat.inputs[0] == *p && cat.inputs[1] == *q {
        0
    } else {
        return None;
    };
    nodes.truncate(k - 3);
    Some(order)
}
