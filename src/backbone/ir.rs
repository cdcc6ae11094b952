//! A small writer for OpenVINO IR (version 11): the `.xml` graph and the `.bin` weights that
//! `Core::read_model_from_file` loads. It covers the operations our backbones and heads need,
//! infers each output's shape as it goes (IR ports carry their dimensions), and writes both files
//! to temporary names before renaming them, so a crash never leaves a half-written model.

use std::fmt::Write as _;
use std::path::Path;

/// An output port of a layer, used as the input of later layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    layer: usize,
    port: usize,
}

/// Element types of tensors in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    /// 32-bit float.
    F32,
    /// 64-bit signed integer (axes, shapes).
    I64,
}

impl ElementType {
    fn ir_name(self) -> &'static str {
        match self {
            ElementType::F32 => "f32",
            ElementType::I64 => "i64",
        }
    }
    fn precision(self) -> &'static str {
        match self {
            ElementType::F32 => "FP32",
            ElementType::I64 => "I64",
        }
    }
}

#[derive(Clone)]
struct Layer {
    name: String,
    kind: &'static str,
    version: &'static str,
    data: Vec<(&'static str, String)>,
    inputs: Vec<Output>,
    outputs: Vec<(Vec<usize>, ElementType, Option<String>)>,
}

/// How [`IrGraph::reduce`] combines values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Sum.
    Sum,
    /// Maximum.
    Max,
    /// Minimum.
    Min,
    /// Mean.
    Mean,
}

/// A graph under construction.
#[derive(Clone)]
pub struct IrGraph {
    name: String,
    layers: Vec<Layer>,
    weights: Vec<u8>,
    /// Put before the name of every layer added from now on (two networks in one graph).
    prefix: String,
}

/// Padding of a 2-D convolution: `[top, left, bottom, right]`.
pub type Pads = [usize; 4];

/// A 2-D convolution over NCHW input with OIHW weights (`groups` > 1 for grouped and depthwise
/// convolutions, with `in_per_group` input channels per output channel).
#[derive(Clone, Copy)]
pub struct Conv2d<'a> {
    /// `[out_channels, in_per_group, kernel_h, kernel_w]`.
    pub weight_shape: [usize; 4],
    /// Weights in that order.
    pub weights: &'a [f32],
    /// One bias per output channel.
    pub bias: &'a [f32],
    /// Stride in both directions.
    pub stride: usize,
    /// Padding.
    pub pads: Pads,
    /// Channel groups.
    pub groups: usize,
}

impl IrGraph {
    /// An empty graph called `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            layers: Vec::new(),
            weights: Vec::new(),
            prefix: String::new(),
        }
    }

    /// Names every layer added from now on `{prefix}{name}` (a second network of the same
    /// architecture in one graph, such as a student beside its teacher); empty to stop.
    pub fn set_name_prefix(&mut self, prefix: &str) {
        self.prefix = prefix.to_string();
    }

    /// The shape of an output.
    pub fn shape(&self, output: Output) -> &[usize] {
        &self.layers[output.layer].outputs[output.port].0
    }

    /// Adds an opset1 layer with one f32 output of `shape`.
    fn push(
        &mut self,
        name: &str,
        kind: &'static str,
        data: Vec<(&'static str, String)>,
        inputs: &[Output],
        shape: Vec<usize>,
    ) -> Output {
        self.push_versioned(name, kind, "opset1", data, inputs, shape)
    }

    /// Adds a layer of operation set `version` with one f32 output of `shape`.
    fn push_versioned(
        &mut self,
        name: &str,
        kind: &'static str,
        version: &'static str,
        data: Vec<(&'static str, String)>,
        inputs: &[Output],
        shape: Vec<usize>,
    ) -> Output {
        self.layers.push(Layer {
            name: format!("{}{name}", self.prefix),
            kind,
            version,
            data,
            inputs: inputs.to_vec(),
            outputs: vec![(shape, ElementType::F32, None)],
        });
        Output {
            layer: self.layers.len() - 1,
            port: 0,
        }
    }

    /// A graph input of type f32.
    pub fn parameter(&mut self, name: &str, shape: &[usize]) -> Output {
        let output = self.push(
            name,
            "Parameter",
            vec![("shape", join(shape)), ("element_type", "f32".into())],
            &[],
            shape.to_vec(),
        );
        self.layers[output.layer].outputs[0].2 = Some(name.to_string());
        output
    }

    fn constant(
        &mut self,
        name: &str,
        shape: &[usize],
        element: ElementType,
        bytes: &[u8],
    ) -> Output {
        // Keep every constant 64-byte aligned in the weights file.
        while !self.weights.len().is_multiple_of(64) {
            self.weights.push(0);
        }
        let offset = self.weights.len();
        self.weights.extend_from_slice(bytes);
        let output = self.push(
            name,
            "Const",
            vec![
                ("element_type", element.ir_name().into()),
                ("shape", join(shape)),
                ("offset", offset.to_string()),
                ("size", bytes.len().to_string()),
            ],
            &[],
            shape.to_vec(),
        );
        self.layers[output.layer].outputs[0].1 = element;
        output
    }

    /// An f32 constant; `data` holds the product of `shape` values in row-major order.
    pub fn constant_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Output {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(name, shape, ElementType::F32, &bytes)
    }

    /// An i64 constant.
    pub fn constant_i64(&mut self, name: &str, shape: &[usize], data: &[i64]) -> Output {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(name, shape, ElementType::I64, &bytes)
    }

    /// 2-D convolution of an NCHW input, plus its per-channel bias.
    pub fn convolution(&mut self, name: &str, input: Output, conv: &Conv2d) -> Output {
        let Conv2d {
            weight_shape,
            weights,
            bias,
            stride,
            pads,
            groups,
        } = *conv;
        let [out_channels, in_per_group, kernel_h, kernel_w] = weight_shape;
        let input_shape = self.shape(input).to_vec();
        let (n, h, w) = (input_shape[0], input_shape[2], input_shape[3]);
        let out_h = (h + pads[0] + pads[2] - kernel_h) / stride + 1;
        let out_w = (w + pads[1] + pads[3] - kernel_w) / stride + 1;
        let data = vec![
            ("strides", format!("{stride},{stride}")),
            ("dilations", "1,1".into()),
            ("pads_begin", format!("{},{}", pads[0], pads[1])),
            ("pads_end", format!("{},{}", pads[2], pads[3])),
            ("auto_pad", "explicit".into()),
        ];
        let convolved = if groups == 1 {
            let kernel = self.constant_f32(&format!("{name}/weights"), &weight_shape, weights);
            self.push(
                name,
                "Convolution",
                data,
                &[input, kernel],
                vec![n, out_channels, out_h, out_w],
            )
        } else {
            let grouped_shape = [
                groups,
                out_channels / groups,
                in_per_group,
                kernel_h,
                kernel_w,
            ];
            let kernel = self.constant_f32(&format!("{name}/weights"), &grouped_shape, weights);
            self.push(
                name,
                "GroupConvolution",
                data,
                &[input, kernel],
                vec![n, out_channels, out_h, out_w],
            )
        };
        let bias = self.constant_f32(&format!("{name}/bias"), &[1, out_channels, 1, 1], bias);
        self.add(&format!("{name}/add_bias"), convolved, bias)
    }

    fn binary(&mut self, name: &str, kind: &'static str, a: Output, b: Output) -> Output {
        let shape = broadcast(self.shape(a), self.shape(b));
        self.push(
            name,
            kind,
            vec![("auto_broadcast", "numpy".into())],
            &[a, b],
            shape,
        )
    }

    /// Element-wise sum with NumPy broadcasting.
    pub fn add(&mut self, name: &str, a: Output, b: Output) -> Output {
        self.binary(name, "Add", a, b)
    }

    /// Element-wise product with NumPy broadcasting.
    pub fn multiply(&mut self, name: &str, a: Output, b: Output) -> Output {
        self.binary(name, "Multiply", a, b)
    }

    /// Element-wise quotient `a / b` with NumPy broadcasting.
    pub fn divide(&mut self, name: &str, a: Output, b: Output) -> Output {
        self.binary(name, "Divide", a, b)
    }

    /// Clamp to `[min, max]` (ReLU6 is `clamp(0, 6)`).
    pub fn clamp(&mut self, name: &str, input: Output, min: f32, max: f32) -> Output {
        let shape = self.shape(input).to_vec();
        self.push(
            name,
            "Clamp",
            vec![("min", format!("{min}")), ("max", format!("{max}"))],
            &[input],
            shape,
        )
    }

    /// Mean over the spatial axes of an NCHW tensor: `[n, c]`.
    pub fn global_average_pool(&mut self, name: &str, input: Output) -> Output {
        let shape = self.shape(input).to_vec();
        let axes = self.constant_i64(&format!("{name}/axes"), &[2], &[2, 3]);
        self.push(
            name,
            "ReduceMean",
            vec![("keep_dims", "false".into())],
            &[input, axes],
            vec![shape[0], shape[1]],
        )
    }

    /// A fully connected layer: `input [n, k] x weights [m, k]^T + bias [m]`.
    pub fn linear(
        &mut self,
        name: &str,
        input: Output,
        weights: &[f32],
        bias: &[f32],
        out_features: usize,
    ) -> Output {
        let in_features = self.shape(input)[1];
        let batch = self.shape(input)[0];
        let matrix = self.constant_f32(
            &format!("{name}/weights"),
            &[out_features, in_features],
            weights,
        );
        let product = self.push(
            name,
            "MatMul",
            vec![
                ("transpose_a", "false".into()),
                ("transpose_b", "true".into()),
            ],
            &[input, matrix],
            vec![batch, out_features],
        );
        let bias = self.constant_f32(&format!("{name}/bias"), &[1, out_features], bias);
        self.add(&format!("{name}/add_bias"), product, bias)
    }

    /// Resizes the spatial axes of an NCHW tensor to `height` x `width` (bilinear, half-pixel
    /// centres, as PyTorch's `align_corners=False`).
    pub fn resize_bilinear(
        &mut self,
        name: &str,
        input: Output,
        height: usize,
        width: usize,
    ) -> Output {
        let shape = self.shape(input).to_vec();
        let sizes = self.constant_i64(
            &format!("{name}/sizes"),
            &[2],
            &[height as i64, width as i64],
        );
        let axes = self.constant_i64(&format!("{name}/axes"), &[2], &[2, 3]);
        self.push_versioned(
            name,
            "Interpolate",
            "opset11",
            vec![
                ("mode", "linear_onnx".into()),
                ("shape_calculation_mode", "sizes".into()),
                ("coordinate_transformation_mode", "half_pixel".into()),
                ("nearest_mode", "round_prefer_floor".into()),
                ("antialias", "false".into()),
                ("pads_begin", "0,0,0,0".into()),
                ("pads_end", "0,0,0,0".into()),
                ("cube_coeff", "-0.75".into()),
            ],
            &[input, sizes, axes],
            vec![shape[0], shape[1], height, width],
        )
    }

    /// Concatenates along `axis`.
    pub fn concat(&mut self, name: &str, inputs: &[Output], axis: usize) -> Output {
        let mut shape = self.shape(inputs[0]).to_vec();
        shape[axis] = inputs.iter().map(|i| self.shape(*i)[axis]).sum();
        self.push(
            name,
            "Concat",
            vec![("axis", axis.to_string())],
            inputs,
            shape,
        )
    }

    /// Picks `indices` along `axis`.
    pub fn gather(&mut self, name: &str, input: Output, indices: &[i64], axis: usize) -> Output {
        let mut shape = self.shape(input).to_vec();
        shape[axis] = indices.len();
        let indices = self.constant_i64(&format!("{name}/indices"), &[indices.len()], indices);
        let axis_const = self.constant_i64(&format!("{name}/axis"), &[], &[axis as i64]);
        self.push_versioned(
            name,
            "Gather",
            "opset8",
            vec![("batch_dims", "0".into())],
            &[input, indices, axis_const],
            shape,
        )
    }

    /// Reshapes to `shape` (same number of elements).
    pub fn reshape(&mut self, name: &str, input: Output, shape: &[usize]) -> Output {
        debug_assert_eq!(
            self.shape(input).iter().product::<usize>(),
            shape.iter().product::<usize>()
        );
        let target: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let target = self.constant_i64(&format!("{name}/shape"), &[shape.len()], &target);
        self.push(
            name,
            "Reshape",
            vec![("special_zero", "false".into())],
            &[input, target],
            shape.to_vec(),
        )
    }

    /// Permutes the axes.
    pub fn transpose(&mut self, name: &str, input: Output, order: &[usize]) -> Output {
        let shape: Vec<usize> = order.iter().map(|&axis| self.shape(input)[axis]).collect();
        let order: Vec<i64> = order.iter().map(|&axis| axis as i64).collect();
        let order = self.constant_i64(&format!("{name}/order"), &[order.len()], &order);
        self.push(name, "Transpose", Vec::new(), &[input, order], shape)
    }

    /// Element-wise difference with NumPy broadcasting.
    pub fn subtract(&mut self, name: &str, a: Output, b: Output) -> Output {
        self.binary(name, "Subtract", a, b)
    }

    /// Batched matrix product `a [.., m, k] x b [.., k, n]`.
    pub fn matmul(&mut self, name: &str, a: Output, b: Output) -> Output {
        let mut shape = self.shape(a).to_vec();
        let n = *self.shape(b).last().unwrap_or(&1);
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        self.push(
            name,
            "MatMul",
            vec![
                ("transpose_a", "false".into()),
                ("transpose_b", "false".into()),
            ],
            &[a, b],
            shape,
        )
    }

    /// Reduces over `axes`, dropping them.
    pub fn reduce(
        &mut self,
        name: &str,
        input: Output,
        axes: &[usize],
        reduction: Reduction,
    ) -> Output {
        let shape: Vec<usize> = self
            .shape(input)
            .iter()
            .enumerate()
            .filter(|(axis, _)| !axes.contains(axis))
            .map(|(_, d)| *d)
            .collect();
        let axes: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
        let axes = self.constant_i64(&format!("{name}/axes"), &[axes.len()], &axes);
        let kind = match reduction {
            Reduction::Sum => "ReduceSum",
            Reduction::Max => "ReduceMax",
            Reduction::Min => "ReduceMin",
            Reduction::Mean => "ReduceMean",
        };
        self.push(
            name,
            kind,
            vec![("keep_dims", "false".into())],
            &[input, axes],
            shape,
        )
    }

    /// Average pooling of an NCHW tensor over `kernel` x `kernel` windows with stride 1, padded
    /// to keep the size with zeros that count in the average (torch's `AvgPool2d(k, 1, k / 2)`,
    /// which PatchCore's locally aware features use): border windows are damped towards zero.
    /// Averaging only the pixels inside the image instead made every border patch of an unseen
    /// board look anomalous and cut PatchCore's image AUROC on DeepPCB from 0.91 to 0.57.
    pub fn average_pool_same(&mut self, name: &str, input: Output, kernel: usize) -> Output {
        self.average_pool(name, input, kernel, 1, kernel / 2)
    }

    /// Average pooling of an NCHW tensor over `kernel` x `kernel` windows `stride` apart, padded
    /// by `pad` zeros on every side that count in the average (torch's
    /// `AvgPool2d(kernel, stride, pad)`), sizes rounded down.
    pub fn average_pool(
        &mut self,
        name: &str,
        input: Output,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Output {
        let shape = self.shape(input).to_vec();
        let out = |side: usize| (side + 2 * pad - kernel) / stride + 1;
        self.push(
            name,
            "AvgPool",
            vec![
                ("strides", format!("{stride},{stride}")),
                ("pads_begin", format!("{pad},{pad}")),
                ("pads_end", format!("{pad},{pad}")),
                ("kernel", format!("{kernel},{kernel}")),
                ("exclude-pad", "false".into()),
                ("rounding_type", "floor".into()),
                ("auto_pad", "explicit".into()),
            ],
            &[input],
            vec![shape[0], shape[1], out(shape[2]), out(shape[3])],
        )
    }

    /// `max(x, 0)`, element-wise.
    pub fn relu(&mut self, name: &str, input: Output) -> Output {
        let shape = self.shape(input).to_vec();
        self.push(name, "Relu", Vec::new(), &[input], shape)
    }

    /// The `k` largest (or smallest, without `largest`) values along `axis`, sorted, and their
    /// indices (i64); equal values in index order.
    pub fn top_k(
        &mut self,
        name: &str,
        input: Output,
        axis: usize,
        k: usize,
        largest: bool,
    ) -> (Output, Output) {
        self.push_top_k(name, input, axis, k, largest, true)
    }

    /// [`IrGraph::top_k`] with equal values in any order, which OpenVINO's CPU plugin computes
    /// several times faster on long rows.
    pub fn top_k_ties_any_order(
        &mut self,
        name: &str,
        input: Output,
        axis: usize,
        k: usize,
        largest: bool,
    ) -> (Output, Output) {
        self.push_top_k(name, input, axis, k, largest, false)
    }

    fn push_top_k(
        &mut self,
        name: &str,
        input: Output,
        axis: usize,
        k: usize,
        largest: bool,
        stable: bool,
    ) -> (Output, Output) {
        let mut shape = self.shape(input).to_vec();
        shape[axis] = k;
        let k_const = self.constant_i64(&format!("{name}/k"), &[], &[k as i64]);
        self.layers.push(Layer {
            name: name.to_string(),
            kind: "TopK",
            version: "opset11",
            data: vec![
                ("axis", axis.to_string()),
                ("mode", if largest { "max" } else { "min" }.into()),
                ("sort", "value".into()),
                ("index_element_type", "i64".into()),
                ("stable", stable.to_string()),
            ],
            inputs: vec![input, k_const],
            outputs: vec![
                (shape.clone(), ElementType::F32, None),
                (shape, ElementType::I64, None),
            ],
        });
        let layer = self.layers.len() - 1;
        (Output { layer, port: 0 }, Output { layer, port: 1 })
    }

    /// Picks entries of `input` along `axis` at run-time `indices` (i64); the output shape is
    /// `input`'s with `axis` replaced by the shape of `indices`.
    pub fn gather_at(&mut self, name: &str, input: Output, indices: Output, axis: usize) -> Output {
        let input_shape = self.shape(input).to_vec();
        let element = self.layers[input.layer].outputs[input.port].1;
        let mut shape = input_shape[..axis].to_vec();
        shape.extend_from_slice(self.shape(indices));
        shape.extend_from_slice(&input_shape[axis + 1..]);
        let axis_const = self.constant_i64(&format!("{name}/axis"), &[], &[axis as i64]);
        self.layers.push(Layer {
            name: name.to_string(),
            kind: "Gather",
            version: "opset8",
            data: vec![("batch_dims", "0".into())],
            inputs: vec![input, indices, axis_const],
            outputs: vec![(shape, element, None)],
        });
        Output {
            layer: self.layers.len() - 1,
            port: 0,
        }
    }

    /// Softmax along `axis`.
    pub fn softmax(&mut self, name: &str, input: Output, axis: usize) -> Output {
        let shape = self.shape(input).to_vec();
        self.push_versioned(
            name,
            "SoftMax",
            "opset8",
            vec![("axis", axis.to_string())],
            &[input],
            shape,
        )
    }

    /// Element-wise square root.
    pub fn sqrt(&mut self, name: &str, input: Output) -> Output {
        let shape = self.shape(input).to_vec();
        self.push(name, "Sqrt", Vec::new(), &[input], shape)
    }

    /// Marks `output` as a graph output called `name`.
    pub fn result(&mut self, name: &str, output: Output) {
        self.layers[output.layer].outputs[output.port].2 = Some(name.to_string());
        self.layers.push(Layer {
            name: format!("{name}/sink_port_0"),
            kind: "Result",
            version: "opset1",
            data: Vec::new(),
            inputs: vec![output],
            outputs: Vec::new(),
        });
    }

    /// The `.xml` text.
    pub fn xml(&self) -> String {
        let mut xml = String::new();
        let _ = writeln!(xml, "<?xml version=\"1.0\"?>");
        let _ = writeln!(xml, "<net name=\"{}\" version=\"11\">", escape(&self.name));
        let _ = writeln!(xml, "\t<layers>");
        let mut edges = Vec::new();
        for (id, layer) in self.layers.iter().enumerate() {
            let _ = writeln!(
                xml,
                "\t\t<layer id=\"{id}\" name=\"{}\" type=\"{}\" version=\"{}\">",
                escape(&layer.name),
                layer.kind,
                layer.version
            );
            if !layer.data.is_empty() {
                let attributes: Vec<String> = layer
                    .data
                    .iter()
                    .map(|(key, value)| format!("{key}=\"{}\"", escape(value)))
                    .collect();
                let _ = writeln!(xml, "\t\t\t<data {}/>", attributes.join(" "));
            }
            if !layer.inputs.is_empty() {
                let _ = writeln!(xml, "\t\t\t<input>");
                for (port, source) in layer.inputs.iter().enumerate() {
                    let (shape, element, _) = &self.layers[source.layer].outputs[source.port];
                    let _ = writeln!(
                        xml,
                        "\t\t\t\t<port id=\"{port}\" precision=\"{}\">{}</port>",
                        element.precision(),
                        dims(shape)
                    );
                    edges.push((
                        source.layer,
                        self.layers[source.layer].inputs.len() + source.port,
                        id,
                        port,
                    ));
                }
                let _ = writeln!(xml, "\t\t\t</input>");
            }
            if !layer.outputs.is_empty() {
                let _ = writeln!(xml, "\t\t\t<output>");
                for (index, (shape, element, names)) in layer.outputs.iter().enumerate() {
                    let port = layer.inputs.len() + index;
                    let names = names
                        .as_ref()
                        .map(|n| format!(" names=\"{}\"", escape(n)))
                        .unwrap_or_default();
                    let _ = writeln!(
                        xml,
                        "\t\t\t\t<port id=\"{port}\" precision=\"{}\"{names}>{}</port>",
                        element.precision(),
                        dims(shape)
                    );
                }
                let _ = writeln!(xml, "\t\t\t</output>");
            }
            let _ = writeln!(xml, "\t\t</layer>");
        }
        let _ = writeln!(xml, "\t</layers>");
        let _ = writeln!(xml, "\t<edges>");
        for (from_layer, from_port, to_layer, to_port) in edges {
            let _ = writeln!(
                xml,
                "\t\t<edge from-layer=\"{from_layer}\" from-port=\"{from_port}\" to-layer=\"{to_layer}\" to-port=\"{to_port}\"/>"
            );
        }
        let _ = writeln!(xml, "\t</edges>");
        let _ = writeln!(xml, "</net>");
        xml
    }

    /// The `.bin` bytes.
    pub fn weights(&self) -> &[u8] {
        &self.weights
    }

    /// Writes `xml_path` and the `.bin` beside it (same stem), each through a temporary file and a
    /// rename.
    pub fn write(&self, xml_path: &Path) -> std::io::Result<()> {
        let bin_path = xml_path.with_extension("bin");
        inspectflow_operators::files::write_atomically(&bin_path, &self.weights)?;
        inspectflow_operators::files::write_atomically(xml_path, self.xml().as_bytes())
    }
}

fn join(shape: &[usize]) -> String {
    shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn dims(shape: &[usize]) -> String {
    shape.iter().map(|d| format!("<dim>{d}</dim>")).collect()
}

fn broadcast(a: &[usize], b: &[usize]) -> Vec<usize> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let pick = |s: &[usize]| {
                if i + s.len() >= rank {
                    s[i + s.len() - rank]
                } else {
                    1
                }
            };
            pick(a).max(pick(b))
        })
        .collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
