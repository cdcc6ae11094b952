//! ONNX export: converts a model package's OpenVINO IR (the `.xml` graph and `.bin` weights our
//! IR writer produces, see [`crate::backbone::ir`]) into an ONNX model (opset 18) that computes
//! the same outputs under the same names, so that tools which read ONNX can run an inspectflow
//! model. Each IR operation maps to its ONNX counterpart one to one (with a Transpose for a
//! transposed MatMul operand and a Reshape for grouped convolution weights); an IR holding an
//! operation outside that set is refused, naming the layer. With `fp16`, float weights are
//! stored as 16-bit floats and cast back to 32 bits inside the graph (half the size).
//!
//! The ONNX protobuf messages are declared here with `prost` (only the fields we write).

use std::collections::HashMap;

use prost::Message;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The IR does not parse or is inconsistent.
    #[error("the model's IR: {0}")]
    Ir(String),
    /// The IR uses an operation this exporter does not convert.
    #[error("layer {layer:?}: the IR operation {kind} has no ONNX conversion here")]
    Unsupported {
        /// The layer's name.
        layer: String,
        /// Its IR type.
        kind: String,
    },
}

/// Export settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnnxOptions {
    /// Store float weights as 16-bit floats.
    pub fp16: bool,
}

// ONNX data types.
const FLOAT: i32 = 1;
const INT64: i32 = 7;
const FLOAT16: i32 = 10;
// ONNX attribute types.
const ATTR_FLOAT: i32 = 1;
const ATTR_INT: i32 = 2;
const ATTR_STRING: i32 = 3;
const ATTR_INTS: i32 = 7;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(string, tag = "2")]
    producer_name: String,
    #[prost(string, tag = "3")]
    producer_version: String,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(float, tag = "2")]
    f: f32,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(bytes = "vec", tag = "4")]
    s: Vec<u8>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    #[prost(int32, tag = "20")]
    r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
struct Dimension {
    #[prost(int64, tag = "1")]
    dim_value: i64,
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: value,
        r#type: ATTR_INT,
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: ATTR_INTS,
        ..Default::default()
    }
}

fn string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        s: value.as_bytes().to_vec(),
        r#type: ATTR_STRING,
        ..Default::default()
    }
}

fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: value,
        r#type: ATTR_FLOAT,
        ..Default::default()
    }
}

fn value_info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type,
                shape: Some(TensorShapeProto {
                    dim: dims.iter().map(|&d| Dimension { dim_value: d }).collect(),
                }),
            }),
        }),
    }
}

/// One port of an IR layer.
struct Port {
    id: String,
    precision: String,
    dims: Vec<i64>,
    names: Option<String>,
}

/// One IR layer.
struct Layer<'a> {
    id: String,
    name: String,
    kind: String,
    data: HashMap<&'a str, &'a str>,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

/// Most layers an IR may hold for export.
const MAX_LAYERS: usize = 100_000;

/// The graph being written.
struct Writer<'a> {
    bin: &'a [u8],
    options: OnnxOptions,
    graph: GraphProto,
    /// The ONNX tensor name of each IR (layer id, port id).
    tensors: HashMap<(String, String), String>,
    /// Where each (layer id, input port id) is fed from.
    edges: HashMap<(String, String), (String, String)>,
    /// Integer constants by tensor name (axes, orders, k), read at conversion time.
    integers: HashMap<String, Vec<i64>>,
    fresh: usize,
}

/// Converts the IR (`xml` with its weights `bin`) into ONNX bytes.
pub fn ir_to_onnx(xml: &str, bin: &[u8], options: OnnxOptions) -> Result<Vec<u8>, OnnxError> {
    let document = roxmltree::Document::parse_with_options(
        xml,
        roxmltree::ParsingOptions {
            allow_dtd: false,
            nodes_limit: 4_000_000,
            ..roxmltree::ParsingOptions::default()
        },
    )
    .map_err(|e| OnnxError::Ir(e.to_string()))?;
    let net = document.root_element();
    let layers_node =
        child(net, "layers").ok_or_else(|| OnnxError::Ir("no <layers> element".into()))?;
    let mut layers = Vec::new();
    for node in layers_node.children().filter(|n| n.has_tag_name("layer")) {
        if layers.len() >= MAX_LAYERS {
            return Err(OnnxError::Ir(format!("more than {MAX_LAYERS} layers")));
        }
        let attribute = |name: &str| node.attribute(name).unwrap_or_default().to_string();
        let data = child(node, "data")
            .map(|d| d.attributes().map(|a| (a.name(), a.value())).collect())
            .unwrap_or_default();
        let ports = |section: &str| -> Vec<roxmltree::Node<'_, '_>> {
            child(node, section)
                .map(|s| s.children().filter(|p| p.has_tag_name("port")).collect())
                .unwrap_or_default()
        };
        let port = |p: &roxmltree::Node<'_, '_>| Port {
            id: p.attribute("id").unwrap_or_default().to_string(),
            precision: p.attribute("precision").unwrap_or("FP32").to_string(),
            dims: p
                .children()
                .filter(|d| d.has_tag_name("dim"))
                .filter_map(|d| d.text()?.trim().parse().ok())
                .collect(),
            names: p.attribute("names").map(str::to_string),
        };
        let inputs = ports("input").iter().map(port).collect();
        let outputs = ports("output").iter().map(port).collect();
        layers.push(Layer {
            id: attribute("id"),
            name: attribute("name"),
            kind: attribute("type"),
            data,
            inputs,
            outputs,
        });
    }
    let mut writer = Writer {
        bin,
        options,
        graph: GraphProto {
            name: net.attribute("name").unwrap_or("inspectflow").to_string(),
            ..Default::default()
        },
        tensors: HashMap::new(),
        edges: HashMap::new(),
        integers: HashMap::new(),
        fresh: 0,
    };
    if let Some(edges) = child(net, "edges") {
        for edge in edges.children().filter(|n| n.has_tag_name("edge")) {
            let get = |name: &str| edge.attribute(name).unwrap_or_default().to_string();
            writer.edges.insert(
                (get("to-layer"), get("to-port")),
                (get("from-layer"), get("from-port")),
            );
        }
    }
    for layer in &layers {
        for port in &layer.outputs {
            let name = port
                .names
                .as_deref()
                .and_then(|n| n.split(',').next())
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("{}:{}", layer.name, port.id));
            writer
                .tensors
                .insert((layer.id.clone(), port.id.clone()), name);
        }
    }
    // The IR lists layers in an order where producers come first (our writer's order); ONNX
    // wants the same.
    for layer in &layers {
        writer.convert(layer)?;
    }
    let model = ModelProto {
        ir_version: 8,
        producer_name: "inspectflow".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(writer.graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 18,
        }],
    };
    Ok(model.encode_to_vec())
}

/// The ONNX operation of an element-wise IR operation (same inputs, one output, no attributes).
fn elementwise(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Add" => "Add",
        "Multiply" => "Mul",
        "Subtract" => "Sub",
        "Divide" => "Div",
        "Sqrt" => "Sqrt",
        "Relu" => "Relu",
        "Sigmoid" => "Sigmoid",
        "Exp" => "Exp",
        _ => return None,
    })
}

/// The first child element of `parent` called `name`.
fn child<'a, 'input>(
    parent: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    parent.children().find(|n| n.has_tag_name(name))
}

/// The ONNX element type of an IR port.
fn element_of(layer: &Layer, port: &Port) -> Result<i32, OnnxError> {
    match port.precision.as_str() {
        "FP32" => Ok(FLOAT),
        "FP16" => Ok(FLOAT16),
        "I64" => Ok(INT64),
        other => Err(Writer::invalid(
            layer,
            format!("ports of precision {other}"),
        )),
    }
}

fn parse_list(text: &str) -> Vec<i64> {
    text.split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

impl Writer<'_> {
    fn invalid(layer: &Layer, message: impl std::fmt::Display) -> OnnxError {
        OnnxError::Ir(format!(
            "layer {:?} ({}): {message}",
            layer.name, layer.kind
        ))
    }

    /// The ONNX name of input `index` of `layer`.
    fn input(&self, layer: &Layer, index: usize) -> Result<String, OnnxError> {
        let port = layer
            .inputs
            .get(index)
            .ok_or_else(|| Self::invalid(layer, format!("no input {index}")))?;
        let port = &port.id;
        let source = self
            .edges
            .get(&(layer.id.clone(), port.clone()))
            .ok_or_else(|| Self::invalid(layer, format!("input port {port} is not connected")))?;
        self.tensors
            .get(source)
            .cloned()
            .ok_or_else(|| Self::invalid(layer, format!("input port {port} has no producer")))
    }

    /// The integer constant feeding input `index` (axes, orders, k).
    fn integer_input(&self, layer: &Layer, index: usize) -> Result<Vec<i64>, OnnxError> {
        let name = self.input(layer, index)?;
        self.integers.get(&name).cloned().ok_or_else(|| {
            Self::invalid(layer, format!("input {index} must be an integer constant"))
        })
    }

    fn output(&self, layer: &Layer, index: usize) -> Result<String, OnnxError> {
        let port = layer
            .outputs
            .get(index)
            .ok_or_else(|| Self::invalid(layer, format!("no output {index}")))?;
        Ok(self.tensors[&(layer.id.clone(), port.id.clone())].clone())
    }

    fn data<'d>(&self, layer: &'d Layer, key: &str) -> &'d str {
        layer.data.get(key).copied().unwrap_or_default()
    }

    fn fresh_name(&mut self, base: &str) -> String {
        self.fresh += 1;
        format!("{base}/onnx_{}", self.fresh)
    }

    fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: Vec<String>,
        outputs: Vec<String>,
        attribute: Vec<AttributeProto>,
    ) {
        self.graph.node.push(NodeProto {
            input: inputs,
            output: outputs,
            name: name.to_string(),
            op_type: op_type.into(),
            attribute,
        });
    }

    fn initializer(&mut self, name: String, data_type: i32, dims: &[i64], raw_data: Vec<u8>) {
        self.graph.initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type,
            name,
            raw_data,
        });
    }

    /// An int64 initializer holding `values`.
    fn int64_constant(&mut self, base: &str, dims: &[i64], values: &[i64]) -> String {
        let name = self.fresh_name(base);
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name.clone(), INT64, dims, bytes);
        name
    }

    /// A float scalar initializer.
    fn float_scalar(&mut self, base: &str, value: f32) -> String {
        let name = self.fresh_name(base);
        self.initializer(name.clone(), FLOAT, &[], value.to_le_bytes().to_vec());
        name
    }

    /// `input` with its last two axes swapped (rank `rank`).
    fn swap_last_two(&mut self, layer: &Layer, input: String, rank: usize) -> String {
        let mut perm: Vec<i64> = (0..rank as i64).collect();
        perm.swap(rank - 2, rank - 1);
        let output = self.fresh_name(&layer.name);
        self.node(
            "Transpose",
            &output,
            vec![input],
            vec![output.clone()],
            vec![ints("perm", &perm)],
        );
        output
    }

    /// The ONNX names of every input of `layer`, in order.
    fn all_inputs(&self, layer: &Layer) -> Result<Vec<String>, OnnxError> {
        (0..layer.inputs.len())
            .map(|i| self.input(layer, i))
            .collect()
    }

    fn convert(&mut self, layer: &Layer) -> Result<(), OnnxError> {
        let name = layer.name.clone();
        if let Some(op) = elementwise(&layer.kind) {
            let (inputs, output) = (self.all_inputs(layer)?, self.output(layer, 0)?);
            self.node(op, &name, inputs, vec![output], Vec::new());
            return Ok(());
        }
        match layer.kind.as_str() {
            "Parameter" => {
                let output = self.output(layer, 0)?;
                let port = &layer.outputs[0];
                let info = value_info(&output, element_of(layer, port)?, &port.dims);
                self.graph.input.push(info);
            }
            "Const" => self.constant(layer)?,
            "Result" => {
                let source = self.input(layer, 0)?;
                let port = &layer.inputs[0];
                let info = value_info(&source, element_of(layer, port)?, &port.dims);
                self.graph.output.push(info);
            }
            "Convert" => {
                let to = match self.data(layer, "destination_type") {
                    "f32" => FLOAT,
                    "f16" => FLOAT16,
                    "i64" => INT64,
                    other => return Err(Self::invalid(layer, format!("converts to {other}"))),
                };
                let (input, output) = (self.input(layer, 0)?, self.output(layer, 0)?);
                self.node(
                    "Cast",
                    &name,
                    vec![input],
                    vec![output],
                    vec![int("to", to.into())],
                );
            }
            "Clamp" => {
                let min: f32 = self.data(layer, "min").parse().unwrap_or(f32::MIN);
                let max: f32 = self.data(layer, "max").parse().unwrap_or(f32::MAX);
                let (low, high) = (self.float_scalar(&name, min), self.float_scalar(&name, max));
                let (input, output) = (self.input(layer, 0)?, self.output(layer, 0)?);
                self.node(
                    "Clip",
                    &name,
                    vec![input, low, high],
                    vec![output],
                    Vec::new(),
                );
            }
            "Convolution" | "GroupConvolution" => self.convolution(layer)?,
            "MatMul" => {
                let mut a = self.input(layer, 0)?;
                let mut b = self.input(layer, 1)?;
                let rank = |index: usize| layer.inputs[index].dims.len();
                if self.data(layer, "transpose_a") == "true" && rank(0) >= 2 {
                    a = self.swap_last_two(layer, a, rank(0));
                }
                if self.data(layer, "transpose_b") == "true" && rank(1) >= 2 {
                    b = self.swap_last_two(layer, b, rank(1));
                }
                let output = self.output(layer, 0)?;
                self.node("MatMul", &name, vec![a, b], vec![output], Vec::new());
            }
            "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" => {
                let keep = i64::from(self.data(layer, "keep_dims") == "true");
                let inputs = vec![self.input(layer, 0)?, self.input(layer, 1)?];
                let output = self.output(layer, 0)?;
                let op = layer.kind.clone();
                self.node(
                    &op,
                    &name,
                    inputs,
                    vec![output],
                    vec![int("keepdims", keep)],
                );
            }
            "Interpolate" => self.interpolate(layer)?,
            "Concat" => {
                let axis: i64 = self.data(layer, "axis").parse().unwrap_or(0);
                let inputs = self.all_inputs(layer)?;
                let output = self.output(layer, 0)?;
                self.node(
                    "Concat",
                    &name,
                    inputs,
                    vec![output],
                    vec![int("axis", axis)],
                );
            }
            "Gather" => {
                if !matches!(self.data(layer, "batch_dims"), "" | "0") {
                    return Err(Self::invalid(layer, "batch_dims other than 0"));
                }
                let axis = self.integer_input(layer, 2)?;
                let inputs = vec![self.input(layer, 0)?, self.input(layer, 1)?];
                let output = self.output(layer, 0)?;
                let axis = axis.first().copied().unwrap_or(0);
                self.node(
                    "Gather",
                    &name,
                    inputs,
                    vec![output],
                    vec![int("axis", axis)],
                );
            }
            "Reshape" => {
                if self.data(layer, "special_zero") == "true" {
                    return Err(Self::invalid(layer, "special_zero reshapes"));
                }
                let inputs = vec![self.input(layer, 0)?, self.input(layer, 1)?];
                let output = self.output(layer, 0)?;
                self.node("Reshape", &name, inputs, vec![output], Vec::new());
            }
            "Transpose" => {
                let order = self.integer_input(layer, 1)?;
                let (input, output) = (self.input(layer, 0)?, self.output(layer, 0)?);
                self.node(
                    "Transpose",
                    &name,
                    vec![input],
                    vec![output],
                    vec![ints("perm", &order)],
                );
            }
            "AvgPool" => {
                if !matches!(self.data(layer, "auto_pad"), "" | "explicit" | "notset") {
                    return Err(Self::invalid(layer, "pooling with automatic padding"));
                }
                let begin = parse_list(self.data(layer, "pads_begin"));
                let end = parse_list(self.data(layer, "pads_end"));
                let attributes = vec![
                    ints("kernel_shape", &parse_list(self.data(layer, "kernel"))),
                    ints("strides", &parse_list(self.data(layer, "strides"))),
                    ints("pads", &[begin, end].concat()),
                    int(
                        "count_include_pad",
                        i64::from(self.data(layer, "exclude-pad") != "true"),
                    ),
                    int(
                        "ceil_mode",
                        i64::from(self.data(layer, "rounding_type") == "ceil"),
                    ),
                ];
                let (input, output) = (self.input(layer, 0)?, self.output(layer, 0)?);
                self.node("AveragePool", &name, vec![input], vec![output], attributes);
            }
            "TopK" => {
                if !matches!(self.data(layer, "sort"), "" | "value") {
                    return Err(Self::invalid(layer, "TopK not sorted by value"));
                }
                let k = self.integer_input(layer, 1)?;
                let k = self.int64_constant(&name, &[1], &k[..1.min(k.len())]);
                let input = self.input(layer, 0)?;
                let outputs = vec![self.output(layer, 0)?, self.output(layer, 1)?];
                let axis: i64 = self.data(layer, "axis").parse().unwrap_or(-1);
                let largest = i64::from(self.data(layer, "mode") != "min");
                let attributes = vec![int("axis", axis), int("largest", largest), int("sorted", 1)];
                self.node("TopK", &name, vec![input, k], outputs, attributes);
            }
            "SoftMax" => {
                let axis: i64 = self.data(layer, "axis").parse().unwrap_or(1);
                let (input, output) = (self.input(layer, 0)?, self.output(layer, 0)?);
                self.node(
                    "Softmax",
                    &name,
                    vec![input],
                    vec![output],
                    vec![int("axis", axis)],
                );
            }
            _ => {
                return Err(OnnxError::Unsupported {
                    layer: layer.name.clone(),
                    kind: layer.kind.clone(),
                });
            }
        }
        Ok(())
    }

    fn constant(&mut self, layer: &Layer) -> Result<(), OnnxError> {
        let offset: usize = self.data(layer, "offset").parse().unwrap_or(0);
        let size: usize = self.data(layer, "size").parse().unwrap_or(0);
        let bytes = offset
            .checked_add(size)
            .and_then(|end| self.bin.get(offset..end))
            .ok_or_else(|| Self::invalid(layer, "its weights lie outside the .bin file"))?
            .to_vec();
        let dims = parse_list(self.data(layer, "shape"));
        let output = self.output(layer, 0)?;
        match self.data(layer, "element_type") {
            "i64" => {
                let values: Vec<i64> = bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect();
                self.integers.insert(output.clone(), values);
                self.initializer(output, INT64, &dims, bytes);
            }
            "f32" if self.options.fp16 => {
                let halves: Vec<u8> = bytes
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let value = f32::from_le_bytes(c.try_into().unwrap_or_default());
                        half::f16::from_f32(value).to_bits().to_le_bytes()
                    })
                    .collect();
                let stored = format!("{output}/fp16");
                self.initializer(stored.clone(), FLOAT16, &dims, halves);
                self.node(
                    "Cast",
                    &format!("{output}/to_fp32"),
                    vec![stored],
                    vec![output],
                    vec![int("to", FLOAT.into())],
                );
            }
            "f32" => self.initializer(output, FLOAT, &dims, bytes),
            "f16" => self.initializer(output, FLOAT16, &dims, bytes),
            other => return Err(Self::invalid(layer, format!("constants of type {other}"))),
        }
        Ok(())
    }

    fn convolution(&mut self, layer: &Layer) -> Result<(), OnnxError> {
        let name = layer.name.clone();
        let input = self.input(layer, 0)?;
        let mut weights = self.input(layer, 1)?;
        let mut attributes = vec![
            ints("strides", &parse_list(self.data(layer, "strides"))),
            ints("dilations", &parse_list(self.data(layer, "dilations"))),
        ];
        match self.data(layer, "auto_pad") {
            "" | "explicit" | "notset" => {
                let begin = parse_list(self.data(layer, "pads_begin"));
                let end = parse_list(self.data(layer, "pads_end"));
                attributes.push(ints("pads", &[begin, end].concat()));
            }
            "same_upper" => attributes.push(string("auto_pad", "SAME_UPPER")),
            "same_lower" => attributes.push(string("auto_pad", "SAME_LOWER")),
            "valid" => attributes.push(string("auto_pad", "VALID")),
            other => return Err(Self::invalid(layer, format!("auto_pad {other}"))),
        }
        if layer.kind == "GroupConvolution" {
            // IR: [groups, out / groups, in / groups, kh, kw]; ONNX: [out, in / groups, kh, kw].
            let dims = layer.inputs[1].dims.clone();
            if dims.len() != 5 {
                return Err(Self::invalid(layer, "grouped weights must have 5 axes"));
            }
            let shape = [dims[0] * dims[1], dims[2], dims[3], dims[4]];
            let target = self.int64_constant(&name, &[4], &shape);
            let reshaped = self.fresh_name(&name);
            self.node(
                "Reshape",
                &reshaped,
                vec![weights, target],
                vec![reshaped.clone()],
                Vec::new(),
            );
            weights = reshaped;
            attributes.push(int("group", dims[0]));
        }
        let output = self.output(layer, 0)?;
        self.node(
            "Conv",
            &name,
            vec![input, weights],
            vec![output],
            attributes,
        );
        Ok(())
    }

    fn interpolate(&mut self, layer: &Layer) -> Result<(), OnnxError> {
        let name = layer.name.clone();
        let mode = match self.data(layer, "mode") {
            "linear_onnx" | "linear" => "linear",
            "nearest" => "nearest",
            "cubic" => "cubic",
            other => return Err(Self::invalid(layer, format!("mode {other}"))),
        };
        let output = self.output(layer, 0)?;
        let unpadded = |key: &str| parse_list(self.data(layer, key)).iter().all(|&p| p == 0);
        if !unpadded("pads_begin")
            || !unpadded("pads_end")
            || self.data(layer, "antialias") == "true"
        {
            return Err(Self::invalid(layer, "padded or antialiased interpolation"));
        }
        let sizes = layer.outputs[0].dims.clone();
        let sizes = self.int64_constant(&name, &[sizes.len() as i64], &sizes);
        let input = self.input(layer, 0)?;
        let mut attributes = vec![
            string("mode", mode),
            string(
                "coordinate_transformation_mode",
                match self.data(layer, "coordinate_transformation_mode") {
                    "" => "half_pixel",
                    other => other,
                },
            ),
        ];
        if mode == "nearest" {
            let rounding = match self.data(layer, "nearest_mode") {
                "" => "round_prefer_floor",
                "simple" => return Err(Self::invalid(layer, "nearest_mode simple")),
                other => other,
            };
            attributes.push(string("nearest_mode", rounding));
        }
        if mode == "cubic" {
            let coefficient: f32 = self.data(layer, "cube_coeff").parse().unwrap_or(-0.75);
            attributes.push(float("cubic_coeff_a", coefficient));
        }
        self.node(
            "Resize",
            &name,
            vec![input, String::new(), String::new(), sizes],
            vec![output],
            attributes,
        );
        Ok(())
    }
}

/// The format `:export` and `inspectflow export` write a package in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// The package as it is: `manifest.json`, `model.xml`, `model.bin`.
    #[default]
    Openvino,
    /// `model.onnx` in place of the IR, beside the same manifest.
    Onnx,
}

/// Why a package could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A package file could not be read (the server's fault, not the request's).
    #[error("{0}")]
    Io(String),
    /// The package's network has no ONNX conversion here.
    #[error(transparent)]
    Unconvertible(#[from] OnnxError),
}

/// One member of an exported package.
enum PackageMember {
    /// A file of the package, already open: it stays readable while the export is sent, even
    /// if the model is deleted meanwhile.
    File(std::fs::File),
    /// Bytes made for the export (`model.onnx`).
    Made(Vec<u8>),
}

/// A model package ready to be written as a zip: its members found, opened or converted, so
/// that everything that can fail for a reason the client should hear (an IR without an ONNX
/// conversion) fails before the first byte, and the zip itself is written as it is sent.
pub struct PackageExport {
    /// (name in the zip, content), sorted by name.
    members: Vec<(String, PackageMember)>,
}

impl PackageExport {
    /// Writes the package as a zip of stored members (the weights are float data that barely
    /// compresses) to `out`, which need not seek: each file is copied through a 64 KiB buffer,
    /// so memory does not grow with the package.
    pub fn write_zip(self, out: impl std::io::Write) -> Result<(), String> {
        let mut writer = zip::ZipWriter::new_stream(out);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        for (name, member) in self.members {
            writer
                .start_file(name.as_str(), options)
                .map_err(|e| format!("zip {name}: {e}"))?;
            let copied = match member {
                PackageMember::Made(bytes) => std::io::Write::write_all(&mut writer, &bytes),
                PackageMember::File(file) => {
                    let mut file = std::io::BufReader::with_capacity(64 << 10, file);
                    std::io::copy(&mut file, &mut writer).map(drop)
                }
            };
            copied.map_err(|e| format!("zip {name}: {e}"))?;
        }
        writer.finish().map(drop).map_err(|e| format!("zip: {e}"))
    }
}

/// The package in `dir` in `format`, ready to be zipped: its files opened, and with
/// [`ExportFormat::Onnx`] the IR converted to `model.onnx` in place of `model.xml` and
/// `model.bin`.
pub fn package_files(
    dir: &std::path::Path,
    format: ExportFormat,
    options: OnnxOptions,
) -> Result<PackageExport, ExportError> {
    let io_error = |path: &std::path::Path, e: std::io::Error| {
        ExportError::Io(format!("cannot read {}: {e}", path.display()))
    };
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| io_error(path, e));
    let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    let model = dir.join(crate::operators::package::MODEL_FILE);
    let weights = model.with_extension("bin");
    let mut members = Vec::new();
    if format == ExportFormat::Onnx {
        let xml = String::from_utf8(read(&model)?)
            .map_err(|_| OnnxError::Ir(format!("{} is not UTF-8", model.display())))?;
        let onnx = ir_to_onnx(&xml, &read(&weights)?, options)?;
        members.push(("model.onnx".to_string(), PackageMember::Made(onnx)));
    }
    for path in paths {
        if format == ExportFormat::Onnx && (path == model || path == weights) {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = std::fs::File::open(&path).map_err(|e| io_error(&path, e))?;
        members.push((name, PackageMember::File(file)));
    }
    members.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(PackageExport { members })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_zips_whole_while_streamed_even_when_deleted_meanwhile() {
        let dir = std::env::temp_dir().join(format!("inspectflow-zip-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let weights: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join("model.bin"), &weights).expect("bin");
        std::fs::write(dir.join("model.xml"), "<net/>").expect("xml");
        std::fs::write(dir.join("manifest.json"), "{}").expect("manifest");
        let package =
            package_files(&dir, ExportFormat::Openvino, OnnxOptions::default()).expect("package");
        std::fs::remove_dir_all(&dir).expect("deleted before it is sent");
        // A writer that cannot seek, as an HTTP body.
        struct Body(Vec<u8>);
        impl std::io::Write for Body {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut body = Body(Vec::new());
        package.write_zip(&mut body).expect("zip");
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(body.0)).expect("a zip");
        let names: Vec<String> = (0..zip.len())
            .map(|i| {
                zip.name_for_index(i)
                    .expect("index")
                    .expect("name")
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["manifest.json", "model.bin", "model.xml"]);
        let mut unpacked = Vec::new();
        std::io::Read::read_to_end(&mut zip.by_name("model.bin").expect("bin"), &mut unpacked)
            .expect("read");
        assert!(unpacked == weights, "the weights come back byte for byte");
    }

    #[test]
    fn an_operation_without_conversion_is_refused_naming_its_layer() {
        let mut graph = crate::backbone::ir::IrGraph::new("t");
        let input = graph.parameter("input", &[1, 2]);
        let root = graph.sqrt("root", input);
        graph.result("out", root);
        let xml = graph.xml().replace("type=\"Sqrt\"", "type=\"Floor\"");
        let error = ir_to_onnx(&xml, graph.weights(), OnnxOptions::default()).expect_err("refused");
        assert!(
            error.to_string().contains("\"root\"") && error.to_string().contains("Floor"),
            "{error}"
        );
        let error = ir_to_onnx("<net><layers>", &[], OnnxOptions::default()).expect_err("refused");
        assert!(error.to_string().starts_with("the model's IR"), "{error}");
    }
}
