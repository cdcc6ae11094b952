//! `inspectflow graph FILE`: the validated graph in Graphviz DOT, with each edge's ports, payload
//! type and queue (capacity and policy).

use std::fmt::Write;

use inspectflow_operators::OperatorKind;

use super::ValidatedGraph;

/// DOT text for `graph`.
pub fn to_dot(graph: &ValidatedGraph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape(&graph.name));
    let _ = writeln!(out, "  rankdir=LR;");
    let _ = writeln!(out, "  node [fontname=\"Helvetica\", fontsize=11];");
    let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=9];");
    for node in &graph.nodes {
        let (shape, colour) = match node.descriptor.kind {
            OperatorKind::Source => ("house", "#d8ecff"),
            OperatorKind::Transform => ("box", "#f2f2f2"),
            OperatorKind::Sink => ("invhouse", "#dff5df"),
        };
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{}\\n{}\", shape={shape}, style=filled, fillcolor=\"{colour}\"];",
            escape(&node.id),
            escape(&node.id),
            escape(node.descriptor.name)
        );
    }
    for edge in &graph.edges {
        let from = &graph.nodes[edge.from];
        let to = &graph.nodes[edge.to];
        let _ = writeln!(
            out,
            "  \"{}\" -> \"{}\" [label=\"{} → {}\\n{} | {} x{}\"];",
            escape(&from.id),
            escape(&to.id),
            from.descriptor.outputs[edge.from_port].name,
            to.descriptor.inputs[edge.to_port].name,
            edge.payload.name(),
            edge.policy.name(),
            edge.capacity
        );
    }
    out.push_str("}\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}
