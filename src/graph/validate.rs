//! Validation before anything runs. Every check runs and every problem is reported at once, each
//! naming the file, the node and the field (and the line and column where the parser knows them):
//! unknown operators, unknown / missing / ill-typed parameters, edges to unknown nodes or ports,
//! duplicate ids, port type mismatches, cycles, unconnected inputs and nodes no source reaches.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};

use inspectflow_operators::registry::closest;
use inspectflow_operators::{OperatorKind, OutputType, PortType, Registry};
use serde_json::Value;

use super::limits::{GraphLimits, exceeded};
use super::parse::Document;
use super::spec::{DEFAULT_QUEUE_CAPACITY, EdgeSpec, NodeSpec, QueuePolicy};
use super::{GraphError, GraphErrors, ValidatedEdge, ValidatedGraph, ValidatedNode};

/// Collects errors, locating each through the document's positions.
struct Report<'a> {
    document: &'a Document,
    /// Node id by index in the file, for naming nodes in errors.
    node_ids: Vec<Option<String>>,
    errors: Vec<GraphError>,
}

impl Report<'_> {
    /// Records an error at a JSON pointer. `field` is the dotted path shown to the user.
    fn add(
        &mut self,
        pointer: &str,
        node: Option<&str>,
        field: Option<String>,
        message: impl Into<String>,
    ) {
        let position = self.document.locations.find(pointer);
        self.errors.push(GraphError {
            file: self.document.file.clone(),
            line: position.map(|p| p.0),
            column: position.map(|p| p.1),
            node: node.map(str::to_string),
            field,
            message: message.into(),
        });
    }

    /// Records an error at `pointer`, working out the node and field from it: `/nodes/3/params/x`
    /// becomes node `<id of node 3>`, field `params.x`; `/edges/1/to` becomes field `edges[1].to`.
    fn add_at_pointer(&mut self, pointer: &str, message: impl Into<String>) {
        let segments: Vec<&str> = pointer.split('/').skip(1).collect();
        let (node, field) = match segments.as_slice() {
            ["nodes", index, rest @ ..] => {
                let id = index
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| self.node_ids.get(i).cloned().flatten())
                    .unwrap_or_else(|| format!("nodes[{index}]"));
                (Some(id), (!rest.is_empty()).then(|| dotted(rest)))
            }
            ["edges", index, rest @ ..] => {
                let mut field = format!("edges[{index}]");
                if !rest.is_empty() {
                    field = format!("{field}.{}", dotted(rest));
                }
                (None, Some(field))
            }
            [] => (None, None),
            rest => (None, Some(dotted(rest))),
        };
        self.add(pointer, node.as_deref(), field, message);
    }
}

/// `["params", "mean", "1"]` → `params.mean[1]`.
fn dotted(segments: &[&str]) -> String {
    let mut out = String::new();
    for segment in segments {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if segment.parse::<usize>().is_ok() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

/// `reconnect.max_backoff_ms` → `reconnect/max_backoff_ms`, `std[1]` → `std/1`: a dotted field
/// as JSON pointer segments, so that errors are located at the value itself.
fn pointer_segments(field: &str) -> String {
    field
        .replace('[', ".")
        .replace(']', "")
        .split('.')
        .filter(|segment| !segment.is_empty())
        .map(|segment| segment.replace('~', "~0").replace('/', "~1"))
        .collect::<Vec<_>>()
        .join("/")
}

/// Validates the structure of a graph file against the schema of the graph model.
fn structural_validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        jsonschema::validator_for(&super::schema::graph_structure_schema())
            .unwrap_or_else(|e| panic!("the generated graph schema is invalid: {e}"))
    })
}

/// Reports every schema violation of `instance`, prefixing pointers with `base`.
fn report_schema_errors(
    report: &mut Report,
    validator: &jsonschema::Validator,
    instance: &Value,
    base: &str,
) {
    for error in validator.iter_errors(instance) {
        let mut pointer = format!("{base}{}", error.instance_path().as_str());
        let message = match error.kind() {
            jsonschema::error::ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                pointer = format!("{pointer}/{name}");
                format!("missing required field '{name}'")
            }
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                for name in unexpected {
                    let field_pointer = format!("{pointer}/{name}");
                    report.add_at_pointer(&field_pointer, format!("unknown field '{name}'"));
                }
                continue;
            }
            _ => error.to_string(),
        };
        report.add_at_pointer(&pointer, message);
    }
}

/// Errors after which unknown node names no longer get a "did you mean" (each costs a pass over
/// every node id).
const SUGGESTIONS_UP_TO_ERRORS: usize = 20;

/// An endpoint `node` or `node.port`.
fn split_endpoint(endpoint: &str) -> (&str, Option<&str>) {
    match endpoint.split_once('.') {
        Some((node, port)) => (node, Some(port)),
        None => (endpoint, None),
    }
}

/// Validates a parsed document against the operators in `registry`.
pub fn validate(
    document: &Document,
    registry: &Registry,
    limits: &GraphLimits,
) -> Result<ValidatedGraph, GraphErrors> {
    let empty = Vec::new();
    let raw_nodes = document
        .value
        .get("nodes")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let raw_edges = document
        .value
        .get("edges")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (count, limit, what, flag) in [
        (
            raw_nodes.len(),
            limits.max_nodes,
            "nodes",
            "--graph-max-nodes",
        ),
        (
            raw_edges.len(),
            limits.max_edges,
            "edges",
            "--graph-max-edges",
        ),
    ] {
        if count > limit {
            return Err(GraphErrors(vec![GraphError {
                field: Some(what.to_string()),
                ..GraphError::in_file(&document.file, exceeded(what, limit, flag))
            }]));
        }
    }
    let mut report = Report {
        document,
        node_ids: raw_nodes
            .iter()
            .map(|node| node.get("id").and_then(Value::as_str).map(str::to_string))
            .collect(),
        errors: Vec::new(),
    };

    // 1. Structure, against the graph model's schema.
    report_schema_errors(&mut report, structural_validator(), &document.value, "");
    if !document.value.is_object() {
        return Err(GraphErrors(report.errors));
    }
    let structure_ok = report.errors.is_empty();

    // 2. Read what can be read, node by node, so that one broken node hides nothing else.
    let mut nodes: Vec<(usize, NodeSpec)> = Vec::new();
    for (index, raw) in raw_nodes.iter().enumerate() {
        match serde_json::from_value::<NodeSpec>(raw.clone()) {
            Ok(node) => nodes.push((index, node)),
            Err(e) if structure_ok => {
                report.add_at_pointer(&format!("/nodes/{index}"), e.to_string())
            }
            Err(_) => {}
        }
    }
    let mut edges: Vec<(usize, EdgeSpec)> = Vec::new();
    for (index, raw) in raw_edges.iter().enumerate() {
        match serde_json::from_value::<EdgeSpec>(raw.clone()) {
            Ok(edge) => edges.push((index, edge)),
            Err(e) if structure_ok => {
                report.add_at_pointer(&format!("/edges/{index}"), e.to_string())
            }
            Err(_) => {}
        }
    }

    // 3. Node ids, operators and parameters.
    let mut first_by_id: HashMap<String, usize> = HashMap::new();
    let mut validated: Vec<(usize, ValidatedNode)> = Vec::new();
    for (index, node) in &nodes {
        let pointer = format!("/nodes/{index}");
        if let Some(first) = first_by_id.get(&node.id) {
            let first_line = document
                .locations
                .find(&format!("/nodes/{first}/id"))
                .map(|(line, _)| format!(" (first defined at line {line})"))
                .unwrap_or_default();
            report.add(
                &format!("{pointer}/id"),
                Some(&node.id),
                Some("id".into()),
                format!("duplicate node id '{}'{first_line}", node.id),
            );
            continue;
        }
        first_by_id.insert(node.id.clone(), *index);
        let Some(descriptor) = registry.get(&node.op) else {
            let hint = registry
                .suggest(&node.op)
                .map(|name| format!(" (did you mean '{name}'?)"))
                .unwrap_or_default();
            report.add(
                &format!("{pointer}/op"),
                Some(&node.id),
                Some("op".into()),
                format!(
                    "unknown operator '{}'{hint}; `inspectflow operators` lists them",
                    node.op
                ),
            );
            continue;
        };
        let errors_before = report.errors.len();
        // Compiled once per operator and process, not per node or per validation.
        match descriptor.params_validator() {
            Ok(validator) => report_schema_errors(
                &mut report,
                validator,
                &node.params,
                &format!("{pointer}/params"),
            ),
            Err(e) => report.add(
                &pointer,
                Some(&node.id),
                None,
                format!("operator schema is broken: {e}"),
            ),
        }
        // The operator's own rules (its `validate` hook), once the schema is satisfied.
        if report.errors.len() == errors_before
            && let Err(error) = descriptor.check_params(&node.params)
        {
            let (field, field_pointer) = if error.field.is_empty() {
                ("params".to_string(), format!("{pointer}/params"))
            } else {
                (
                    format!("params.{}", error.field),
                    format!("{pointer}/params/{}", pointer_segments(&error.field)),
                )
            };
            report.add(&field_pointer, Some(&node.id), Some(field), error.message);
        }
        if node.batch.is_some() && !descriptor.supports_batching {
            report.add(
                &format!("{pointer}/batch"),
                Some(&node.id),
                Some("batch".into()),
                format!("operator '{}' does not take batches", node.op),
            );
        }
        let replicas = node.replicas.unwrap_or(1);
        if replicas > 1 && !descriptor.replicable {
            report.add(
                &format!("{pointer}/replicas"),
                Some(&node.id),
                Some("replicas".into()),
                format!(
                    "operator '{}' keeps state between packets (or work in flight), so it runs \
                     as one instance; remove `replicas`",
                    node.op
                ),
            );
        } else if replicas > 1 && node.batch.is_some() {
            report.add(
                &format!("{pointer}/replicas"),
                Some(&node.id),
                Some("replicas".into()),
                "`replicas` and `batch` do not go together: a batch is one call of one instance"
                    .to_string(),
            );
        }
        validated.push((
            *index,
            ValidatedNode {
                id: Arc::from(node.id.as_str()),
                descriptor: Arc::clone(descriptor),
                params: node.params.clone(),
                restart: node.restart.clone(),
                batch: node.batch.clone(),
                replicas,
            },
        ));
    }
    let position_of: HashMap<&str, usize> = validated
        .iter()
        .enumerate()
        .map(|(position, (_, node))| (&*node.id, position))
        .collect();

    // 4. Edges: endpoints exist, ports exist.
    struct Link {
        file_index: usize,
        from: usize,
        from_port: usize,
        to: usize,
        to_port: usize,
    }
    let mut links: Vec<Link> = Vec::new();
    let mut seen_links = HashSet::new();
    for (index, edge) in &edges {
        let resolve = |report: &mut Report,
                       field: &str,
                       endpoint: &str,
                       output: bool|
         -> Option<(usize, usize)> {
            let pointer = format!("/edges/{index}/{field}");
            let field_name = Some(format!("edges[{index}].{field}"));
            let (node_id, port) = split_endpoint(endpoint);
            let Some(&position) = position_of.get(node_id) else {
                if !first_by_id.contains_key(node_id) {
                    // Suggestions compare against every id: offered for the first few unknown
                    // endpoints only, so that validation stays linear in the graph's size.
                    let hint = if report.errors.len() < SUGGESTIONS_UP_TO_ERRORS {
                        closest(node_id, position_of.keys().copied())
                            .map(|id| format!(" (did you mean '{id}'?)"))
                            .unwrap_or_default()
                    } else {
                        String::new()
                    };
                    report.add(
                        &pointer,
                        None,
                        field_name,
                        format!("unknown node '{node_id}'{hint}"),
                    );
                }
                return None;
            };
            let descriptor = &validated[position].1.descriptor;
            let names: Vec<&str> = if output {
                descriptor.outputs.iter().map(|p| p.name).collect()
            } else {
                descriptor.inputs.iter().map(|p| p.name).collect()
            };
            let direction = if output { "output" } else { "input" };
            if names.is_empty() {
                let what = if output {
                    "a sink: it has no outputs"
                } else {
                    "a source: it has no inputs"
                };
                report.add(
                    &pointer,
                    Some(node_id),
                    field_name,
                    format!("node '{node_id}' is {what}"),
                );
                return None;
            }
            let port_index = match port {
                Some(port) => names.iter().position(|name| *name == port),
                None if names.len() == 1 => Some(0),
                None => {
                    report.add(
                        &pointer,
                        Some(node_id),
                        field_name,
                        format!("node '{node_id}' has several {direction} ports ({}); name one as '{node_id}.<port>'", names.join(", ")),
                    );
                    return None;
                }
            };
            if port_index.is_none() {
                report.add(
                    &pointer,
                    Some(node_id),
                    field_name,
                    format!(
                        "node '{node_id}' ({}) has no {direction} port '{}'; its {direction} ports: {}",
                        descriptor.name,
                        port.unwrap_or_default(),
                        names.join(", ")
                    ),
                );
            }
            port_index.map(|p| (position, p))
        };
        let from = resolve(&mut report, "from", &edge.from, true);
        let to = resolve(&mut report, "to", &edge.to, false);
        if let (Some((from, from_port)), Some((to, to_port))) = (from, to) {
            if !seen_links.insert((from, from_port, to, to_port)) {
                report.add(
                    &format!("/edges/{index}"),
                    None,
                    Some(format!("edges[{index}]")),
                    format!("duplicate edge from '{}' to '{}'", edge.from, edge.to),
                );
                continue;
            }
            links.push(Link {
                file_index: *index,
                from,
                from_port,
                to,
                to_port,
            });
        }
    }

    // 5. Shape of the graph: unconnected inputs, cycles, reachability.
    let count = validated.len();
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); count];
    let mut incoming = vec![0usize; count];
    // Links into each node, by index into `links`.
    let mut links_into: Vec<Vec<usize>> = vec![Vec::new(); count];
    let mut connected_inputs: HashSet<(usize, usize)> = HashSet::new();
    let mut connected_outputs: HashSet<(usize, usize)> = HashSet::new();
    for (link_index, link) in links.iter().enumerate() {
        downstream[link.from].push(link.to);
        incoming[link.to] += 1;
        links_into[link.to].push(link_index);
        connected_inputs.insert((link.to, link.to_port));
        connected_outputs.insert((link.from, link.from_port));
    }
    for (position, (index, node)) in validated.iter().enumerate() {
        for (port_index, port) in node.descriptor.inputs.iter().enumerate() {
            if !connected_inputs.contains(&(position, port_index)) {
                let what = if node.descriptor.kind == OperatorKind::Sink {
                    "sink"
                } else {
                    "node"
                };
                report.add(
                    &format!("/nodes/{index}"),
                    Some(&node.id),
                    Some(format!("inputs.{}", port.name)),
                    format!(
                        "{what} has no input: no edge goes to '{}.{}'",
                        node.id, port.name
                    ),
                );
            }
        }
    }
    for (position, (index, node)) in validated.iter().enumerate() {
        for (port_index, port) in node.descriptor.outputs.iter().enumerate() {
            if !connected_outputs.contains(&(position, port_index)) {
                report.add(
                    &format!("/nodes/{index}"),
                    Some(&node.id),
                    Some(format!("outputs.{}", port.name)),
                    format!(
                        "output '{}.{}' goes nowhere: add an edge from it",
                        node.id, port.name
                    ),
                );
            }
        }
    }
    // Kahn's algorithm: whatever is left over sits on a cycle.
    let mut order = Vec::with_capacity(count);
    let mut remaining = incoming.clone();
    let mut ready: VecDeque<usize> = (0..count).filter(|&n| remaining[n] == 0).collect();
    while let Some(node) = ready.pop_front() {
        order.push(node);
        for &next in &downstream[node] {
            remaining[next] -= 1;
            if remaining[next] == 0 {
                ready.push_back(next);
            }
        }
    }
    let on_cycle: Vec<bool> = remaining.iter().map(|&left| left > 0).collect();
    let cycle_nodes: Vec<usize> = (0..count).filter(|&n| on_cycle[n]).collect();
    /// Partners named in each cycle error; a long cycle is summarised, not listed per node.
    const PARTNERS_NAMED: usize = 5;
    for &position in &cycle_nodes {
        let (index, node) = &validated[position];
        let mut partners: Vec<&str> = cycle_nodes
            .iter()
            .filter(|&&other| other != position)
            .take(PARTNERS_NAMED)
            .map(|&other| &*validated[other].1.id)
            .collect();
        let more = cycle_nodes.len() - 1 - partners.len();
        let more = format!("{more} more");
        if cycle_nodes.len() - 1 > PARTNERS_NAMED {
            partners.push(&more);
        }
        report.add(
            &format!("/nodes/{index}"),
            Some(&node.id),
            Some("edges".into()),
            format!("node is on a cycle (with {})", partners.join(", ")),
        );
    }
    let mut reached = vec![false; count];
    let mut frontier: VecDeque<usize> = (0..count)
        .filter(|&n| validated[n].1.descriptor.kind == OperatorKind::Source)
        .collect();
    for &source in &frontier {
        reached[source] = true;
    }
    while let Some(node) = frontier.pop_front() {
        for &next in &downstream[node] {
            if !reached[next] {
                reached[next] = true;
                frontier.push_back(next);
            }
        }
    }
    for (position, (index, node)) in validated.iter().enumerate() {
        if !reached[position] && incoming[position] > 0 && !on_cycle[position] {
            report.add(
                &format!("/nodes/{index}"),
                Some(&node.id),
                None,
                "no source reaches this node: every path into it starts at a node without a source",
            );
        }
    }
    if !validated
        .iter()
        .any(|(_, node)| node.descriptor.kind == OperatorKind::Source)
        && !validated.is_empty()
    {
        report.add(
            "/nodes",
            None,
            Some("nodes".into()),
            "the graph has no source",
        );
    }

    // 6. Port types, in topological order (pass-through outputs take their input's type), and
    //    liveness: an edge is live when a live source is upstream of it.
    let mut output_types: Vec<Option<PortType>> = vec![None; count];
    let mut live = vec![false; count];
    for &position in &order {
        let node = &validated[position].1;
        let inputs: Vec<&Link> = links_into[position].iter().map(|&i| &links[i]).collect();
        live[position] = if node.descriptor.kind == OperatorKind::Source {
            node.descriptor.is_live(&node.params)
        } else {
            inputs.iter().any(|l| live[l.from])
        };
        let incoming_type = inputs
            .iter()
            .filter_map(|l| output_types[l.from])
            .min_by_key(|t| t.level());
        output_types[position] = match node.descriptor.outputs.first().map(|p| p.emits) {
            Some(OutputType::Fixed(t)) => Some(t),
            Some(OutputType::SameAsInput) => incoming_type,
            None => None,
        };
    }
    let output_type = |link: &Link| -> Option<PortType> {
        match validated[link.from].1.descriptor.outputs[link.from_port].emits {
            OutputType::Fixed(t) => Some(t),
            OutputType::SameAsInput => output_types[link.from],
        }
    };
    for link in &links {
        let Some(emitted) = output_type(link) else {
            continue;
        };
        let consumer = &validated[link.to].1;
        let wanted = consumer.descriptor.inputs[link.to_port].accepts;
        if !emitted.satisfies(wanted) {
            let producer = &validated[link.from].1;
            report.add(
                &format!("/edges/{}", link.file_index),
                Some(&consumer.id),
                Some(format!("edges[{}]", link.file_index)),
                format!(
                    "port type mismatch: '{}.{}' emits {} but '{}.{}' ({}) needs {}",
                    producer.id,
                    producer.descriptor.outputs[link.from_port].name,
                    emitted.name(),
                    consumer.id,
                    consumer.descriptor.inputs[link.to_port].name,
                    consumer.descriptor.name,
                    wanted.name()
                ),
            );
        }
    }

    // 7. Queues: one per input port; edges into the same port must not disagree about it.
    /// Queue settings of one input port, gathered from the edges into it.
    struct PortQueue {
        first_edge: usize,
        capacity: Option<usize>,
        policy: Option<QueuePolicy>,
    }
    let mut port_queue: HashMap<(usize, usize), PortQueue> = HashMap::new();
    let edge_by_file_index: HashMap<usize, &EdgeSpec> =
        edges.iter().map(|(index, edge)| (*index, edge)).collect();
    // Whether a live source feeds each input port.
    let mut port_is_live: HashMap<(usize, usize), bool> = HashMap::new();
    for link in &links {
        *port_is_live.entry((link.to, link.to_port)).or_default() |= live[link.from];
        let spec = edge_by_file_index
            .get(&link.file_index)
            .and_then(|edge| edge.queue.clone());
        let (capacity, policy) = spec.map(|q| (q.capacity, q.policy)).unwrap_or((None, None));
        let entry = port_queue
            .entry((link.to, link.to_port))
            .or_insert(PortQueue {
                first_edge: link.file_index,
                capacity: None,
                policy: None,
            });
        let conflict = matches!((entry.capacity, capacity), (Some(a), Some(b)) if a != b)
            || matches!((entry.policy, policy), (Some(a), Some(b)) if a != b);
        if conflict {
            report.add(
                &format!("/edges/{}/queue", link.file_index),
                Some(&validated[link.to].1.id),
                Some(format!("edges[{}].queue", link.file_index)),
                format!(
                    "edges into the same input share one queue, and edges[{}] configures it differently",
                    entry.first_edge
                ),
            );
        }
        entry.capacity = entry.capacity.or(capacity);
        entry.policy = entry.policy.or(policy);
    }

    if !report.errors.is_empty() {
        return Err(GraphErrors(report.errors));
    }
    let spec_name = document
        .value
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| file_stem(&document.file));
    let validated_edges = links
        .iter()
        .map(|link| {
            let PortQueue {
                capacity, policy, ..
            } = port_queue[&(link.to, link.to_port)];
            let port_live = port_is_live[&(link.to, link.to_port)];
            ValidatedEdge {
                from: link.from,
                from_port: link.from_port,
                to: link.to,
                to_port: link.to_port,
                capacity: capacity.unwrap_or(DEFAULT_QUEUE_CAPACITY),
                policy: policy.unwrap_or(if port_live {
                    QueuePolicy::DropOldest
                } else {
                    QueuePolicy::Block
                }),
                payload: output_type(link).unwrap_or(PortType::Any),
                live: port_live,
            }
        })
        .collect();
    Ok(ValidatedGraph {
        name: spec_name,
        file: document.file.clone(),
        nodes: validated.into_iter().map(|(_, node)| node).collect(),
        edges: validated_edges,
    })
}

fn file_stem(file: &str) -> String {
    std::path::Path::new(file)
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.to_string())
}
