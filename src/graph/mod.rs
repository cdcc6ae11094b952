//! Graph files: the model ([`spec`]), reading YAML/JSON with positions ([`parse`]), validation with
//! precise errors ([`validate`]), JSON Schemas ([`schema`]), the README's operator reference
//! ([`reference`]) and DOT output ([`dot`]).
//!
//! [`load`] is the entry point: file in, [`ValidatedGraph`] or every error at once out.

pub mod dot;
pub mod limits;
pub mod parse;
pub mod reference;
pub mod schema;
pub mod spec;
pub mod validate;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use inspectflow_operators::{OperatorDescriptor, PortType, Registry};

pub use limits::GraphLimits;
pub use spec::{BatchSpec, GraphSpec, QueuePolicy, RestartPolicy, RestartSpec};

/// One problem in a graph file, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GraphError {
    /// The file, as named on the command line or in the request.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The node the problem belongs to.
    pub node: Option<String>,
    /// The field, as a dotted path inside the node (`params.width`) or the file (`edges[2].to`).
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl GraphError {
    /// An error about the file as a whole.
    pub fn in_file(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            line: None,
            column: None,
            node: None,
            field: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(node) = &self.node {
            write!(f, "node '{node}': ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field '{field}': ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Every problem found in one graph file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct GraphErrors(pub Vec<GraphError>);

impl fmt::Display for GraphErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// A node that passed validation.
#[derive(Clone)]
pub struct ValidatedNode {
    /// Its id.
    pub id: Arc<str>,
    /// Its operator.
    pub descriptor: Arc<OperatorDescriptor>,
    /// Its parameters (checked against the operator's schema).
    pub params: serde_json::Value,
    /// Restart policy.
    pub restart: RestartSpec,
    /// Batching, for operators that support it.
    pub batch: Option<BatchSpec>,
    /// Instances of the operator side by side (1 unless the graph asks for more).
    pub replicas: usize,
}

/// An edge that passed validation, with its queue settings resolved.
#[derive(Debug, Clone)]
pub struct ValidatedEdge {
    /// Producing node (index into `nodes`).
    pub from: usize,
    /// Output port index on `from`.
    pub from_port: usize,
    /// Consuming node.
    pub to: usize,
    /// Input port index on `to`.
    pub to_port: usize,
    /// Queue capacity of the input port (shared by every edge into that port).
    pub capacity: usize,
    /// Queue policy of the input port.
    pub policy: QueuePolicy,
    /// Payload type carried.
    pub payload: PortType,
    /// Whether a live source feeds this edge (which chose the default policy).
    pub live: bool,
}

/// A graph ready to run.
#[derive(Clone)]
pub struct ValidatedGraph {
    /// Pipeline name.
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// Nodes in file order.
    pub nodes: Vec<ValidatedNode>,
    /// Edges in file order.
    pub edges: Vec<ValidatedEdge>,
}

impl ValidatedGraph {
    /// `node.port` label of an edge's producer.
    pub fn from_label(&self, edge: &ValidatedEdge) -> String {
        let node = &self.nodes[edge.from];
        format!(
            "{}.{}",
            node.id, node.descriptor.outputs[edge.from_port].name
        )
    }

    /// `node.port` label of an edge's consumer.
    pub fn to_label(&self, edge: &ValidatedEdge) -> String {
        let node = &self.nodes[edge.to];
        format!("{}.{}", node.id, node.descriptor.inputs[edge.to_port].name)
    }

    /// Per node, whether a node downstream of it (reached over one edge or more) has an input
    /// that asks for the model input tensor itself ([`PortType::Tensor`]), as `infer.openvino`
    /// does. Operators further down (`anomaly`, `heatmap`, sinks) never read it.
    pub fn tensor_wanted_downstream(&self) -> Vec<bool> {
        let mut wanted = vec![false; self.nodes.len()];
        // The graph is acyclic, so a node's answer settles within as many passes as it has
        // nodes downstream; each pass spreads the answers one edge upstream.
        for _ in 0..self.nodes.len() {
            let mut changed = false;
            for edge in &self.edges {
                let takes_tensor =
                    self.nodes[edge.to].descriptor.inputs[edge.to_port].accepts == PortType::Tensor;
                if (takes_tensor || wanted[edge.to]) && !wanted[edge.from] {
                    wanted[edge.from] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        wanted
    }
}

/// Reads, parses and validates a graph file, held to `limits`.
pub fn load(
    path: &Path,
    registry: &Registry,
    limits: &GraphLimits,
) -> Result<ValidatedGraph, GraphErrors> {
    let document = parse::read_file(path, limits)?;
    validate::validate(&document, registry, limits)
}

/// Parses and validates graph text (`is_json` picks the syntax); `file` names it in errors.
pub fn load_str(
    file: &str,
    text: &str,
    is_json: bool,
    registry: &Registry,
    limits: &GraphLimits,
) -> Result<ValidatedGraph, GraphErrors> {
    let document = parse::parse_text(file, text, is_json, limits)?;
    validate::validate(&document, registry, limits)
}
