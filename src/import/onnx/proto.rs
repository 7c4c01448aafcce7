//! A small decoder of the protobuf wire format for just the parts of
//! `onnx.proto` (ONNX IR 3..10) that an MLP import reads: the graph's nodes,
//! initializers, inputs and outputs, node attributes, and tensors' dims,
//! data type and float data. Every other field is skipped by its wire type.
//!
//! Why hand-written rather than `prost` or `protobuf`: prost needs `protoc`
//! at build time, and a generated `onnx.proto` binding is ~10k lines for the
//! ~25 fields used here. This decoder is bounded (every length is checked
//! against the bytes left, nesting is at most 6 levels deep, nothing is
//! allocated before its bytes were seen), never panics on any input (the
//! `onnx` fuzz target checks that) and reports the field path of what is wrong.

/// Field numbers from onnx.proto (onnx/onnx, IR version 10).
mod field {
    pub const MODEL_IR_VERSION: u32 = 1;
    pub const MODEL_PRODUCER_NAME: u32 = 2;
    pub const MODEL_GRAPH: u32 = 7;
    pub const MODEL_OPSET_IMPORT: u32 = 8;
    pub const MODEL_FUNCTIONS: u32 = 25;

    pub const OPSET_DOMAIN: u32 = 1;
    pub const OPSET_VERSION: u32 = 2;

    pub const GRAPH_NODE: u32 = 1;
    pub const GRAPH_INITIALIZER: u32 = 5;
    pub const GRAPH_SPARSE_INITIALIZER: u32 = 15;
    pub const GRAPH_INPUT: u32 = 11;
    pub const GRAPH_OUTPUT: u32 = 12;

    pub const NODE_INPUT: u32 = 1;
    pub const NODE_OUTPUT: u32 = 2;
    pub const NODE_NAME: u32 = 3;
    pub const NODE_OP_TYPE: u32 = 4;
    pub const NODE_ATTRIBUTE: u32 = 5;
    pub const NODE_DOMAIN: u32 = 7;

    pub const ATTR_NAME: u32 = 1;
    pub const ATTR_F: u32 = 2;
    pub const ATTR_I: u32 = 3;
    pub const ATTR_S: u32 = 4;
    pub const ATTR_T: u32 = 5;
    pub const ATTR_FLOATS: u32 = 7;
    pub const ATTR_INTS: u32 = 8;

    pub const TENSOR_DIMS: u32 = 1;
    pub const TENSOR_DATA_TYPE: u32 = 2;
    pub const TENSOR_FLOAT_DATA: u32 = 4;
    pub const TENSOR_INT32_DATA: u32 = 5;
    pub const TENSOR_INT64_DATA: u32 = 7;
    pub const TENSOR_NAME: u32 = 8;
    pub const TENSOR_RAW_DATA: u32 = 9;
    pub const TENSOR_DOUBLE_DATA: u32 = 10;
    pub const TENSOR_EXTERNAL_DATA: u32 = 13;
    pub const TENSOR_DATA_LOCATION: u32 = 14;

    pub const VALUE_NAME: u32 = 1;
    pub const VALUE_TYPE: u32 = 2;
    pub const TYPE_TENSOR: u32 = 1;
    pub const TYPE_TENSOR_ELEM_TYPE: u32 = 1;
    pub const TYPE_TENSOR_SHAPE: u32 = 2;
    pub const SHAPE_DIM: u32 = 1;
    pub const DIM_VALUE: u32 = 1;
    pub const DIM_PARAM: u32 = 2;
}

/// ONNX `TensorProto.DataType` values this import reads.
pub const DT_FLOAT: i32 = 1;
pub const DT_INT32: i32 = 6;
pub const DT_INT64: i32 = 7;
pub const DT_DOUBLE: i32 = 11;

/// Most dims a tensor may have, and most elements (2^28: 1 GiB of f32),
/// so that a hostile header cannot make the decoder allocate without bound.
const MAX_DIMS: usize = 8;
const MAX_ELEMENTS: u64 = 1 << 28;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ModelProto {
    pub ir_version: i64,
    pub producer_name: String,
    /// (domain, version); the default domain is "".
    pub opset_import: Vec<(String, i64)>,
    pub graph: GraphProto,
    /// Whether the model carries local functions (not supported).
    pub has_functions: bool,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct GraphProto {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub has_sparse_initializers: bool,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct NodeProto {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub attributes: Vec<AttributeProto>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct AttributeProto {
    pub name: String,
    pub f: Option<f32>,
    pub i: Option<i64>,
    pub s: Option<Vec<u8>>,
    pub t: Option<TensorProto>,
    pub floats: Vec<f32>,
    pub ints: Vec<i64>,
}

/// A tensor: dims and its values as f32 (float, double, int32 and int64
/// data are converted; other types keep `values` empty and `data_type` says
/// which it was). `external` is set when the data lives in another file.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TensorProto {
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: i32,
    pub values: Vec<f32>,
    pub external: bool,
}

impl TensorProto {
    /// Number of elements the dims describe (1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))
            .unwrap_or(u64::MAX)
    }
}

/// A graph input or output: name, element type and shape (`None` for a
/// dim without a value, e.g. a symbolic batch size).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: i32,
    pub shape: Option<Vec<Option<i64>>>,
}

/// A decoding error: what was wrong, inside which message.
pub type Error = String;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Where we are, for error messages ("graph.node[3].attribute[0]").
    path: &'a str,
}

enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], path: &'a str) -> Reader<'a> {
        Reader { buf, pos: 0, path }
    }

    fn err(&self, what: &str) -> Error {
        format!("{}: {what} (at byte {})", self.path, self.pos)
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(self.err("truncated varint"));
            };
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.buf.len() - self.pos {
            return Err(self.err(&format!(
                "a field of {n} bytes runs past the end ({} left)",
                self.buf.len() - self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next (field number, value), or None at the end.
    fn next(&mut self) -> Result<Option<(u32, Value<'a>)>, Error> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = (key >> 3) as u32;
        if field == 0 || key >> 3 > u32::MAX as u64 {
            return Err(self.err("field number 0 or too large"));
        }
        let v = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| self.err("length too large"))?;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            t => return Err(self.err(&format!("unsupported wire type {t}"))),
        };
        Ok(Some((field, v)))
    }
}

fn bytes<'a>(v: Value<'a>, r: &Reader, what: &str) -> Result<&'a [u8], Error> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(r.err(&format!("{what}: expected a length-delimited field"))),
    }
}

fn string(v: Value<'_>, r: &Reader, what: &str) -> Result<String, Error> {
    let b = bytes(v, r, what)?;
    String::from_utf8(b.to_vec()).map_err(|_| r.err(&format!("{what}: not UTF-8")))
}

fn int(v: Value<'_>, r: &Reader, what: &str) -> Result<i64, Error> {
    match v {
        Value::Varint(x) => Ok(x as i64),
        _ => Err(r.err(&format!("{what}: expected a varint"))),
    }
}

fn float(v: Value<'_>, r: &Reader, what: &str) -> Result<f32, Error> {
    match v {
        Value::Fixed32(x) => Ok(f32::from_bits(x)),
        _ => Err(r.err(&format!("{what}: expected a 32-bit float"))),
    }
}

/// Repeated varints, packed (one length-delimited field) or not.
fn push_ints(out: &mut Vec<i64>, v: Value<'_>, r: &Reader, what: &str) -> Result<(), Error> {
    match v {
        Value::Varint(x) => out.push(x as i64),
        Value::Bytes(b) => {
            let mut p = Reader::new(b, r.path);
            while p.pos < b.len() {
                out.push(p.varint()? as i64);
            }
        }
        _ => return Err(r.err(&format!("{what}: expected varints"))),
    }
    Ok(())
}

/// Repeated floats, packed or not.
fn push_floats(out: &mut Vec<f32>, v: Value<'_>, r: &Reader, what: &str) -> Result<(), Error> {
    match v {
        Value::Fixed32(x) => out.push(f32::from_bits(x)),
        Value::Bytes(b) if b.len() % 4 == 0 => out.extend(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        ),
        _ => return Err(r.err(&format!("{what}: expected 32-bit floats"))),
    }
    Ok(())
}

/// Repeated doubles, packed or not, as f32.
fn push_doubles(out: &mut Vec<f32>, v: Value<'_>, r: &Reader, what: &str) -> Result<(), Error> {
    match v {
        Value::Fixed64(x) => out.push(f64::from_bits(x) as f32),
        Value::Bytes(b) if b.len() % 8 == 0 => out.extend(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32),
        ),
        _ => return Err(r.err(&format!("{what}: expected 64-bit floats"))),
    }
    Ok(())
}

/// Decode a serialized `ModelProto`.
pub fn decode_model(buf: &[u8]) -> Result<ModelProto, Error> {
    let mut m = ModelProto::default();
    let mut r = Reader::new(buf, "model");
    let mut graph_seen = false;
    while let Some((f, v)) = r.next()? {
        match f {
            field::MODEL_IR_VERSION => m.ir_version = int(v, &r, "ir_version")?,
            field::MODEL_PRODUCER_NAME => m.producer_name = string(v, &r, "producer_name")?,
            field::MODEL_GRAPH => {
                m.graph = decode_graph(bytes(v, &r, "graph")?)?;
                graph_seen = true;
            }
            field::MODEL_OPSET_IMPORT => {
                let b = bytes(v, &r, "opset_import")?;
                let mut o = Reader::new(b, "model.opset_import");
                let (mut domain, mut version) = (String::new(), 0);
                while let Some((f, v)) = o.next()? {
                    match f {
                        field::OPSET_DOMAIN => domain = string(v, &o, "domain")?,
                        field::OPSET_VERSION => version = int(v, &o, "version")?,
                        _ => {}
                    }
                }
                m.opset_import.push((domain, version));
            }
            field::MODEL_FUNCTIONS => m.has_functions = true,
            _ => {}
        }
    }
    if !graph_seen {
        return Err("model: no graph (is this an ONNX model file?)".into());
    }
    Ok(m)
}

fn decode_graph(buf: &[u8]) -> Result<GraphProto, Error> {
    let mut g = GraphProto::default();
    let mut r = Reader::new(buf, "graph");
    while let Some((f, v)) = r.next()? {
        match f {
            field::GRAPH_NODE => g.nodes.push(decode_node(bytes(v, &r, "node")?)?),
            field::GRAPH_INITIALIZER => g.initializers.push(decode_tensor(
                bytes(v, &r, "initializer")?,
                "graph.initializer",
            )?),
            field::GRAPH_SPARSE_INITIALIZER => g.has_sparse_initializers = true,
            field::GRAPH_INPUT => g.inputs.push(decode_value_info(bytes(v, &r, "input")?)?),
            field::GRAPH_OUTPUT => g.outputs.push(decode_value_info(bytes(v, &r, "output")?)?),
            _ => {}
        }
    }
    Ok(g)
}

fn decode_node(buf: &[u8]) -> Result<NodeProto, Error> {
    let mut n = NodeProto::default();
    let mut r = Reader::new(buf, "graph.node");
    while let Some((f, v)) = r.next()? {
        match f {
            field::NODE_INPUT => n.inputs.push(string(v, &r, "input")?),
            field::NODE_OUTPUT => n.outputs.push(string(v, &r, "output")?),
            field::NODE_NAME => n.name = string(v, &r, "name")?,
            field::NODE_OP_TYPE => n.op_type = string(v, &r, "op_type")?,
            field::NODE_DOMAIN => n.domain = string(v, &r, "domain")?,
            field::NODE_ATTRIBUTE => {
                n.attributes
                    .push(decode_attribute(bytes(v, &r, "attribute")?)?)
            }
            _ => {}
        }
    }
    Ok(n)
}

fn decode_attribute(buf: &[u8]) -> Result<AttributeProto, Error> {
    let mut a = AttributeProto::default();
    let mut r = Reader::new(buf, "graph.node.attribute");
    while let Some((f, v)) = r.next()? {
        match f {
            field::ATTR_NAME => a.name = string(v, &r, "name")?,
            field::ATTR_F => a.f = Some(float(v, &r, "f")?),
            field::ATTR_I => a.i = Some(int(v, &r, "i")?),
            field::ATTR_S => a.s = Some(bytes(v, &r, "s")?.to_vec()),
            field::ATTR_T => {
                a.t = Some(decode_tensor(bytes(v, &r, "t")?, "graph.node.attribute.t")?)
            }
            field::ATTR_FLOATS => push_floats(&mut a.floats, v, &r, "floats")?,
            field::ATTR_INTS => push_ints(&mut a.ints, v, &r, "ints")?,
            _ => {}
        }
    }
    Ok(a)
}

fn decode_tensor(buf: &[u8], path: &str) -> Result<TensorProto, Error> {
    let mut t = TensorProto::default();
    let mut r = Reader::new(buf, path);
    let mut raw: Option<&[u8]> = None;
    let (mut floats, mut ints, mut doubles) = (Vec::new(), Vec::new(), Vec::new());
    while let Some((f, v)) = r.next()? {
        match f {
            field::TENSOR_DIMS => {
                push_ints(&mut t.dims, v, &r, "dims")?;
                if t.dims.len() > MAX_DIMS {
                    return Err(r.err(&format!("more than {MAX_DIMS} dims")));
                }
            }
            field::TENSOR_DATA_TYPE => t.data_type = int(v, &r, "data_type")? as i32,
            field::TENSOR_FLOAT_DATA => push_floats(&mut floats, v, &r, "float_data")?,
            field::TENSOR_INT32_DATA | field::TENSOR_INT64_DATA => {
                push_ints(&mut ints, v, &r, "int_data")?
            }
            field::TENSOR_DOUBLE_DATA => push_doubles(&mut doubles, v, &r, "double_data")?,
            field::TENSOR_NAME => t.name = string(v, &r, "name")?,
            field::TENSOR_RAW_DATA => raw = Some(bytes(v, &r, "raw_data")?),
            field::TENSOR_EXTERNAL_DATA => t.external = true,
            field::TENSOR_DATA_LOCATION => t.external |= int(v, &r, "data_location")? == 1,
            _ => {}
        }
    }
    if t.dims.iter().any(|&d| d < 0) {
        return Err(format!("{path} {:?}: negative dim in {:?}", t.name, t.dims));
    }
    let n = t.numel();
    if n > MAX_ELEMENTS {
        return Err(format!(
            "{path} {:?}: {n} elements, more than the {MAX_ELEMENTS} accepted",
            t.name
        ));
    }
    if t.external {
        return Ok(t);
    }
    let n = n as usize;
    let width = match t.data_type {
        DT_FLOAT | DT_INT32 => 4,
        DT_DOUBLE | DT_INT64 => 8,
        _ => return Ok(t), // kept without values; the importer refuses it where it is used
    };
    t.values = match raw {
        Some(raw) => {
            if raw.len() != n * width {
                return Err(format!(
                    "{path} {:?}: raw_data holds {} bytes, dims {:?} need {}",
                    t.name,
                    raw.len(),
                    t.dims,
                    n * width
                ));
            }
            let c = raw.chunks_exact(width);
            match t.data_type {
                DT_FLOAT => c
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                DT_INT32 => c
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                DT_DOUBLE => c
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                _ => c
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
            }
        }
        None => match t.data_type {
            DT_FLOAT => floats,
            DT_DOUBLE => doubles,
            _ => ints.iter().map(|&i| i as f32).collect(),
        },
    };
    if t.values.len() != n {
        return Err(format!(
            "{path} {:?}: holds {} values, dims {:?} need {n}",
            t.name,
            t.values.len(),
            t.dims
        ));
    }
    Ok(t)
}

fn decode_value_info(buf: &[u8]) -> Result<ValueInfo, Error> {
    let mut vi = ValueInfo::default();
    let mut r = Reader::new(buf, "graph.input/output");
    while let Some((f, v)) = r.next()? {
        match f {
            field::VALUE_NAME => vi.name = string(v, &r, "name")?,
            field::VALUE_TYPE => {
                let mut ty = Reader::new(bytes(v, &r, "type")?, "type");
                while let Some((f, v)) = ty.next()? {
                    if f != field::TYPE_TENSOR {
                        continue; // a sequence, map or optional type: elem_type stays 0
                    }
                    let mut tt = Reader::new(bytes(v, &ty, "tensor_type")?, "tensor_type");
                    while let Some((f, v)) = tt.next()? {
                        match f {
                            field::TYPE_TENSOR_ELEM_TYPE => {
                                vi.elem_type = int(v, &tt, "elem_type")? as i32
                            }
                            field::TYPE_TENSOR_SHAPE => {
                                vi.shape = Some(decode_shape(bytes(v, &tt, "shape")?)?)
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(vi)
}

fn decode_shape(buf: &[u8]) -> Result<Vec<Option<i64>>, Error> {
    let mut dims = Vec::new();
    let mut r = Reader::new(buf, "shape");
    while let Some((f, v)) = r.next()? {
        if f != field::SHAPE_DIM {
            continue;
        }
        if dims.len() >= MAX_DIMS {
            return Err(r.err(&format!("more than {MAX_DIMS} dims")));
        }
        let mut d = Reader::new(bytes(v, &r, "dim")?, "shape.dim");
        let mut value = None;
        while let Some((f, v)) = d.next()? {
            match f {
                field::DIM_VALUE => value = Some(int(v, &d, "dim_value")?),
                field::DIM_PARAM => value = None,
                _ => {}
            }
        }
        dims.push(value);
    }
    Ok(dims)
}

impl NodeProto {
    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attributes.iter().find(|a| a.name == name)
    }
    pub fn attr_i(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.i)
    }
    pub fn attr_f(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.f)
    }
    pub fn attr_s(&self, name: &str) -> Option<String> {
        self.attr(name)
            .and_then(|a| a.s.as_ref())
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
