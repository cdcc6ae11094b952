//! The operator registry: every operator a graph file may name, with its kind, typed ports,
//! parameter schema and a factory that builds it from validated parameters.
//!
//! Parameters are plain serde structs with `deny_unknown_fields` and a JSON Schema derived by
//! schemars, so the schema published in `schemas/`, the validation of graph files and the struct
//! the operator receives can never disagree. Programs that embed the engine can register their own
//! operators next to the built-in ones.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::contract::{
    InputPort, OpError, OperatorInstance, OperatorKind, OutputPort, OutputType, PortType,
};
use crate::params::{ParamPath, file_parameter_paths};

type BuildFn = dyn Fn(Value, &str) -> Result<OperatorInstance, OpError> + Send + Sync;
type CheckFn = dyn Fn(&Value) -> Result<(), String> + Send + Sync;
type LiveFn = dyn Fn(&Value) -> bool + Send + Sync;
type TypedLiveFn<P> = dyn Fn(&P) -> bool + Send + Sync;

/// Everything the engine knows about one operator.
pub struct OperatorDescriptor {
    /// Name used in graph files (`op:`), e.g. `source.synthetic`.
    pub name: &'static str,
    /// Source, transform or sink.
    pub kind: OperatorKind,
    /// One line for `inspectflow operators` and the schema's description.
    pub summary: &'static str,
    /// Input ports (empty for sources).
    pub inputs: Vec<InputPort>,
    /// Output ports (empty for sinks).
    pub outputs: Vec<OutputPort>,
    /// Whether the node may be given a `batch` setting.
    pub supports_batching: bool,
    schema: Value,
    file_parameters: Vec<ParamPath>,
    check: Box<CheckFn>,
    live: Box<LiveFn>,
    build: Box<BuildFn>,
}

impl OperatorDescriptor {
    /// Starts describing an operator whose parameters deserialize into `P`.
    pub fn builder<P>(
        name: &'static str,
        kind: OperatorKind,
        summary: &'static str,
    ) -> DescriptorBuilder<P>
    where
        P: DeserializeOwned + schemars::JsonSchema + 'static,
    {
        DescriptorBuilder {
            name,
            kind,
            summary,
            inputs: Vec::new(),
            outputs: Vec::new(),
            supports_batching: false,
            live: None,
        }
    }

    /// JSON Schema (2020-12) of the parameters.
    pub fn params_schema(&self) -> &Value {
        &self.schema
    }

    /// Where the parameters name files and folders (schema `format: path`), for confining them.
    pub fn file_parameter_paths(&self) -> &[ParamPath] {
        &self.file_parameters
    }

    /// Every file or folder these parameters name, with its dotted field name.
    pub fn file_parameters<'a>(&self, params: &'a Value) -> Vec<(String, &'a str)> {
        crate::params::file_parameters(&self.file_parameters, params)
    }

    /// Deserializes the parameters without building anything; the error names the field.
    pub fn check_params(&self, params: &Value) -> Result<(), String> {
        (self.check)(params)
    }

    /// Whether a source with these parameters is live (paced by the outside world, so that its
    /// edges default to `drop_oldest`). Always false for other kinds.
    pub fn is_live(&self, params: &Value) -> bool {
        (self.live)(params)
    }

    /// Builds the operator for node `node_id`. Opens files and devices, so errors here are real
    /// run-time conditions (a missing directory), not schema violations.
    pub fn build(&self, params: Value, node_id: &str) -> Result<OperatorInstance, OpError> {
        (self.build)(params, node_id)
    }
}

/// Builder returned by [`OperatorDescriptor::builder`].
pub struct DescriptorBuilder<P> {
    name: &'static str,
    kind: OperatorKind,
    summary: &'static str,
    inputs: Vec<InputPort>,
    outputs: Vec<OutputPort>,
    supports_batching: bool,
    live: Option<Box<TypedLiveFn<P>>>,
}

impl<P> DescriptorBuilder<P>
where
    P: DeserializeOwned + schemars::JsonSchema + 'static,
{
    /// Adds an input port.
    pub fn input(mut self, name: &'static str, accepts: PortType) -> Self {
        self.inputs.push(InputPort { name, accepts });
        self
    }

    /// Adds an output port.
    pub fn output(mut self, name: &'static str, emits: OutputType) -> Self {
        self.outputs.push(OutputPort { name, emits });
        self
    }

    /// Declares that the operator handles batches (`Transform::process_batch`).
    pub fn batching(mut self) -> Self {
        self.supports_batching = true;
        self
    }

    /// Declares when a source is live, from its parameters.
    pub fn live_when(mut self, live: impl Fn(&P) -> bool + Send + Sync + 'static) -> Self {
        self.live = Some(Box::new(live));
        self
    }

    /// Finishes the descriptor with the factory that builds the operator.
    pub fn build_with(
        self,
        build: impl Fn(P, &str) -> Result<OperatorInstance, OpError> + Send + Sync + 'static,
    ) -> OperatorDescriptor {
        let mut schema = schemars::schema_for!(P).to_value();
        simplify_enum_schemas(&mut schema);
        if let Value::Object(map) = &mut schema {
            map.insert(
                "title".into(),
                Value::String(format!("{} parameters", self.name)),
            );
            map.insert("description".into(), Value::String(self.summary.into()));
        }
        let live = self.live;
        let file_parameters = file_parameter_paths(&schema);
        OperatorDescriptor {
            name: self.name,
            kind: self.kind,
            summary: self.summary,
            inputs: self.inputs,
            outputs: self.outputs,
            supports_batching: self.supports_batching,
            schema,
            file_parameters,
            check: Box::new(|params| {
                serde_json::from_value::<P>(params.clone())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
            live: Box::new(move |params| {
                match (&live, serde_json::from_value::<P>(params.clone())) {
                    (Some(live), Ok(parsed)) => live(&parsed),
                    _ => false,
                }
            }),
            build: Box::new(move |params, node_id| {
                let parsed = serde_json::from_value::<P>(params)
                    .map_err(|e| OpError::param("params", e.to_string()))?;
                build(parsed, node_id)
            }),
        }
    }
}

/// The set of operators a graph may use.
#[derive(Clone)]
pub struct Registry {
    operators: BTreeMap<&'static str, Arc<OperatorDescriptor>>,
}

impl Registry {
    /// A registry with no operators.
    pub fn empty() -> Self {
        Self {
            operators: BTreeMap::new(),
        }
    }

    /// A registry holding every built-in operator.
    pub fn builtin() -> Self {
        let mut registry = Self::empty();
        for descriptor in [
            crate::source::synthetic::descriptor(),
            crate::source::files::descriptor(),
            crate::source::images_folder::descriptor(),
            crate::transform::preprocess::descriptor(),
            crate::infer::operator::descriptor(),
            crate::transform::anomaly::descriptor(),
            crate::transform::heatmap::descriptor(),
            crate::transform::encode::descriptor(),
            crate::transform::identity::descriptor(),
            crate::sink::null::descriptor(),
            crate::sink::folder::descriptor(),
            crate::sink::webhook::descriptor(),
            crate::sink::mqtt::descriptor(),
        ] {
            registry.register(descriptor);
        }
        #[cfg(feature = "gstreamer")]
        for descriptor in [
            crate::video::file::descriptor(),
            crate::video::camera::ip_camera_descriptor(),
            crate::video::camera::usb_camera_descriptor(),
            crate::video::h264::encode_descriptor(),
            crate::video::h264::sink_descriptor(),
        ] {
            registry.register(descriptor);
        }
        registry
    }

    /// Adds (or replaces) an operator.
    pub fn register(&mut self, descriptor: OperatorDescriptor) {
        self.operators.insert(descriptor.name, Arc::new(descriptor));
    }

    /// The operator called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<OperatorDescriptor>> {
        self.operators.get(name)
    }

    /// All operators, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<OperatorDescriptor>> {
        self.operators.values()
    }

    /// The registered name closest to a misspelt one, when one is close enough to suggest.
    pub fn suggest(&self, name: &str) -> Option<&'static str> {
        closest(name, self.operators.keys().copied())
    }
}

/// Rewrites schemars' `oneOf` lists of documented constants into a plain `enum` (with the variant
/// docs folded into the description), so that a wrong value gets "not one of [...]" instead of
/// "not valid under any of the schemas", and editors offer the values for completion.
pub fn simplify_enum_schemas(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let constants = map
                .get("oneOf")
                .and_then(Value::as_array)
                .and_then(|variants| {
                    variants
                        .iter()
                        .map(|variant| {
                            let constant = variant.get("const")?.clone();
                            let doc = variant
                                .get("description")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .trim_end_matches('.');
                            Some((constant, doc.to_string()))
                        })
                        .collect::<Option<Vec<_>>>()
                });
            if let Some(constants) = constants {
                map.remove("oneOf");
                let docs: Vec<String> = constants
                    .iter()
                    .filter(|(_, doc)| !doc.is_empty())
                    .map(|(constant, doc)| {
                        format!("`{}`: {doc}", constant.as_str().unwrap_or_default())
                    })
                    .collect();
                if !docs.is_empty() {
                    let joined = docs.join("; ");
                    let description = match map.get("description").and_then(Value::as_str) {
                        Some(existing) => format!("{existing} {joined}"),
                        None => joined,
                    };
                    map.insert("description".into(), Value::String(description));
                }
                map.insert(
                    "enum".into(),
                    Value::Array(constants.into_iter().map(|(c, _)| c).collect()),
                );
            }
            map.values_mut().for_each(simplify_enum_schemas);
        }
        Value::Array(items) => items.iter_mut().for_each(simplify_enum_schemas),
        _ => {}
    }
}

/// The candidate closest to `wanted` by edit distance, if within a third of its length.
pub fn closest<'a>(wanted: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (wanted.chars().count() / 3).max(2);
    candidates
        .map(|candidate| (edit_distance(wanted, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_nearest_operator_name() {
        let registry = Registry::builtin();
        assert_eq!(registry.suggest("preproces"), Some("preprocess"));
        assert_eq!(registry.suggest("sink.folde"), Some("sink.folder"));
        assert_eq!(registry.suggest("completely.different"), None);
    }

    #[test]
    fn every_builtin_schema_is_an_object_schema_without_extra_fields() {
        for descriptor in Registry::builtin().iter() {
            let schema = descriptor.params_schema();
            assert_eq!(schema["type"], "object", "{}", descriptor.name);
            assert_eq!(schema["additionalProperties"], false, "{}", descriptor.name);
        }
    }
}
