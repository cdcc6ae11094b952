//! The operator registry: every operator a graph file may name, with its kind, typed ports,
//! parameter schema, the rules on its parameters that need code, an optional health check and a
//! factory that builds it from validated parameters.
//!
//! Parameters are plain serde structs with `deny_unknown_fields` and a JSON Schema derived by
//! schemars, so the schema published in `schemas/`, the validation of graph files and the struct
//! the operator receives can never disagree. Rules a schema cannot express (one field against
//! another, a name from a list known only to the code) are the descriptor's `validate` hook, which
//! `inspectflow validate`, the API and the start of a pipeline all run. Programs that embed the
//! engine can register their own operators next to the built-in ones.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, OnceLock};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::contract::{
    InputPort, OpError, OperatorInstance, OperatorKind, OutputPort, OutputType, PortType,
};
use crate::params::{ParamPath, file_parameter_paths};

type BuildFn = dyn Fn(Value, &BuildContext) -> Result<OperatorInstance, OpError> + Send + Sync;
type CheckFn = dyn Fn(&Value) -> Result<(), ParamError> + Send + Sync;
type LiveFn = dyn Fn(&Value) -> bool + Send + Sync;
type TypedLiveFn<P> = dyn Fn(&P) -> bool + Send + Sync;
type TypedRuleFn<P> = dyn Fn(&P) -> Result<(), ParamError> + Send + Sync;

/// A parameter value that breaks one of its operator's rules: the field, as a dotted path inside
/// the node's `params` (`alpha`, `reconnect.max_backoff_ms`, `std[1]`; empty for the parameters
/// as a whole), and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// Dotted path of the field inside `params`; empty for the whole.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ParamError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error for a field nested in `parent` (`reconnect` + `max_backoff_ms` →
    /// `reconnect.max_backoff_ms`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParamError {}

impl From<ParamError> for OpError {
    fn from(error: ParamError) -> Self {
        let field = if error.field.is_empty() {
            "params".to_string()
        } else {
            error.field
        };
        OpError::param(field, error.message)
    }
}

/// What a factory receives besides its parameters. Today that is the node being built; this is
/// the place through which operators will receive what the engine shares between them (a model
/// instance shared by several nodes, for one), so that adding such a resource changes no
/// factory's signature.
#[non_exhaustive]
pub struct BuildContext<'a> {
    /// Id of the node being built (the default stream id of sources, the name in errors).
    pub node_id: &'a str,
    /// Whether a live source (a camera, a realtime file) feeds the node: an operator that can
    /// trade latency for throughput picks latency then.
    pub live_input: bool,
    /// How many live sources the pipeline has. Several cameras are parallel work on the same
    /// cores: an operator that would pick latency for one camera picks throughput for several.
    pub live_sources: usize,
    /// Whether a node downstream takes a tensor (its input asks for one). After a model: when
    /// none does, an operator that has used the tensor may let it go, so that its buffer goes
    /// back to its pool at once instead of travelling with the packet to the sinks. At a
    /// source: its frames go to a model, which needs the cores more than its decoder does.
    pub tensor_wanted_downstream: bool,
}

impl<'a> BuildContext<'a> {
    /// The context for building node `node_id`, fed by no live source.
    pub fn new(node_id: &'a str) -> Self {
        Self {
            node_id,
            live_input: false,
            live_sources: 0,
            tensor_wanted_downstream: true,
        }
    }

    /// The same context, saying whether a live source feeds the node.
    pub fn with_live_input(self, live_input: bool) -> Self {
        Self { live_input, ..self }
    }

    /// The same context, saying how many live sources the pipeline has.
    pub fn with_live_sources(self, live_sources: usize) -> Self {
        Self {
            live_sources,
            ..self
        }
    }

    /// The same context, saying whether a node downstream takes the tensor itself.
    pub fn with_tensor_wanted_downstream(self, tensor_wanted_downstream: bool) -> Self {
        Self {
            tensor_wanted_downstream,
            ..self
        }
    }
}

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
    /// Whether the node may run as several instances (`replicas`): the operator keeps no state
    /// from one packet to the next and hands each result on before `process` returns.
    pub replicable: bool,
    schema: Value,
    /// The parameter schema compiled, once, on first use.
    validator: OnceLock<Result<jsonschema::Validator, String>>,
    file_parameters: Vec<ParamPath>,
    check: Box<CheckFn>,
    health: Option<Box<CheckFn>>,
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
            replicable: false,
            live: None,
            validate: None,
            health: None,
        }
    }

    /// The optional node settings of a graph file this operator accepts besides `params` and
    /// `restart`: `batch` (it takes batches) and `replicas` (it is replicable).
    pub fn node_settings(&self) -> Vec<&'static str> {
        [
            (self.supports_batching, "batch"),
            (self.replicable, "replicas"),
        ]
        .into_iter()
        .filter_map(|(accepted, setting)| accepted.then_some(setting))
        .collect()
    }

    /// JSON Schema (2020-12) of the parameters.
    pub fn params_schema(&self) -> &Value {
        &self.schema
    }

    /// The parameter schema compiled into a validator, once per descriptor (the error says why
    /// the schema does not compile, which would be a bug in the operator).
    pub fn params_validator(&self) -> Result<&jsonschema::Validator, &str> {
        self.validator
            .get_or_init(|| jsonschema::validator_for(&self.schema).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(String::as_str)
    }

    /// Where the parameters name files and folders (schema `format: path`), for confining them.
    pub fn file_parameter_paths(&self) -> &[ParamPath] {
        &self.file_parameters
    }

    /// Every file or folder these parameters name, with its dotted field name.
    pub fn file_parameters<'a>(&self, params: &'a Value) -> Vec<(String, &'a str)> {
        crate::params::file_parameters(&self.file_parameters, params)
    }

    /// Deserializes the parameters and applies the operator's rules (its `validate` hook)
    /// without building anything or touching files, devices or the network; the error names the
    /// field. `inspectflow validate`, the API and the start of a pipeline all run this.
    pub fn check_params(&self, params: &Value) -> Result<(), ParamError> {
        (self.check)(params)?;
        // No file name holds one, and a NUL cannot reach the C libraries that open them.
        for (field, path) in self.file_parameters(params) {
            if path.chars().any(char::is_control) {
                return Err(ParamError::new(field, "the path holds a control character"));
            }
        }
        Ok(())
    }

    /// Whether the operator declares a health check.
    pub fn has_health_check(&self) -> bool {
        self.health.is_some()
    }

    /// Whether what the parameters point at can be reached now (a source's file or folder
    /// exists, its camera device exists, its camera's host accepts a connection); `Ok` for
    /// operators without a health check. May block for a few seconds (a network connection), so
    /// call it off async workers.
    pub fn health(&self, params: &Value) -> Result<(), ParamError> {
        match &self.health {
            Some(health) => health(params),
            None => Ok(()),
        }
    }

    /// Whether a source with these parameters is live (paced by the outside world, so that its
    /// edges default to `drop_oldest`). Always false for other kinds.
    pub fn is_live(&self, params: &Value) -> bool {
        (self.live)(params)
    }

    /// Builds the operator for the node in `context`, after applying the same rules as
    /// [`check_params`](Self::check_params). Opens files and devices, so other errors here are
    /// real run-time conditions (a missing directory), not parameter mistakes.
    pub fn build(
        &self,
        params: Value,
        context: &BuildContext,
    ) -> Result<OperatorInstance, OpError> {
        (self.build)(params, context)
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
    replicable: bool,
    live: Option<Box<TypedLiveFn<P>>>,
    validate: Option<Box<TypedRuleFn<P>>>,
    health: Option<Box<TypedRuleFn<P>>>,
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

    /// Declares that the operator keeps no state from one packet to the next and emits each
    /// packet's results before `process` returns (it never holds work in flight), so that a node
    /// may run several instances of it side by side (`replicas`), the runtime restoring order.
    pub fn replicable(mut self) -> Self {
        self.replicable = true;
        self
    }

    /// Declares when a source is live, from its parameters.
    pub fn live_when(mut self, live: impl Fn(&P) -> bool + Send + Sync + 'static) -> Self {
        self.live = Some(Box::new(live));
        self
    }

    /// Declares the rules on the parameters that the schema cannot express (a pure function of
    /// the parameters: no files, devices, network or environment). Validation and the start of
    /// a pipeline run them; the factory only ever sees parameters that pass.
    pub fn validate(
        mut self,
        rules: impl Fn(&P) -> Result<(), ParamError> + Send + Sync + 'static,
    ) -> Self {
        self.validate = Some(Box::new(rules));
        self
    }

    /// Declares a health check: whether what the parameters point at can be reached now (a
    /// source's file, folder, device or host). The server runs it when a source is stored.
    pub fn health_check(
        mut self,
        check: impl Fn(&P) -> Result<(), ParamError> + Send + Sync + 'static,
    ) -> Self {
        self.health = Some(Box::new(check));
        self
    }

    /// Finishes the descriptor with the factory that builds the operator.
    pub fn build_with(
        self,
        build: impl Fn(P, &BuildContext) -> Result<OperatorInstance, OpError> + Send + Sync + 'static,
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
        let rules: Arc<TypedRuleFn<P>> = match self.validate {
            Some(rules) => Arc::from(rules),
            None => Arc::new(|_: &P| Ok(())),
        };
        let parse = |params: Value| {
            serde_json::from_value::<P>(params).map_err(|e| ParamError::new("", e.to_string()))
        };
        let health = self.health.map(|health| -> Box<CheckFn> {
            Box::new(move |params| health(&parse(params.clone())?))
        });
        let file_parameters = file_parameter_paths(&schema);
        let check_rules = Arc::clone(&rules);
        OperatorDescriptor {
            name: self.name,
            kind: self.kind,
            summary: self.summary,
            inputs: self.inputs,
            outputs: self.outputs,
            supports_batching: self.supports_batching,
            replicable: self.replicable,
            schema,
            validator: OnceLock::new(),
            file_parameters,
            check: Box::new(move |params| check_rules(&parse(params.clone())?)),
            health,
            live: Box::new(move |params| {
                match (&live, serde_json::from_value::<P>(params.clone())) {
                    (Some(live), Ok(parsed)) => live(&parsed),
                    _ => false,
                }
            }),
            build: Box::new(move |params, context| {
                let parsed = parse(params)?;
                rules(&parsed)?;
                build(parsed, context)
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

    /// The built-in operators, built once per process: validation, the server and the command
    /// line all read this one (with each operator's schema compiled once).
    pub fn shared() -> &'static Registry {
        static BUILTIN: LazyLock<Registry> = LazyLock::new(Registry::build_builtin);
        &BUILTIN
    }

    /// A registry holding every built-in operator, to which a program may add its own: a copy of
    /// [`Registry::shared`] (the descriptors themselves are shared, not rebuilt).
    pub fn builtin() -> Self {
        Self::shared().clone()
    }

    fn build_builtin() -> Self {
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
            crate::preview::descriptor(),
            crate::sink::folder::descriptor(),
            crate::sink::webhook::descriptor(),
            crate::sink::mqtt::descriptor(),
            crate::sink::nats::descriptor(),
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
    fn the_builtin_registry_is_built_once_and_each_schema_compiles_once() {
        assert!(std::ptr::eq(Registry::shared(), Registry::shared()));
        let copy = Registry::builtin();
        for descriptor in Registry::shared().iter() {
            let first = descriptor.params_validator().expect("compiles");
            let again = copy
                .get(descriptor.name)
                .expect("same operators")
                .params_validator()
                .expect("compiles");
            assert!(std::ptr::eq(first, again), "{}", descriptor.name);
        }
    }

    #[test]
    fn check_params_applies_the_validate_hook_and_names_the_field() {
        let heatmap = Registry::shared().get("heatmap").expect("registered");
        let error = heatmap
            .check_params(&serde_json::json!({"alpha": 1.5}))
            .expect_err("refused");
        assert_eq!(error.field, "alpha");
        assert_eq!(error.to_string(), "alpha: must be 0 to 1, got 1.5");
        assert!(
            heatmap
                .check_params(&serde_json::json!({"alpha": 0.5}))
                .is_ok()
        );
        let error = heatmap
            .check_params(&serde_json::json!({"alpha": "high"}))
            .expect_err("refused");
        assert!(error.field.is_empty(), "{error}");
    }

    #[test]
    fn a_control_character_in_a_path_or_a_camera_address_is_refused_naming_the_field() {
        let registry = Registry::shared();
        let folder = registry.get("sink.folder").expect("registered");
        let error = folder
            .check_params(&serde_json::json!({"path": "/tmp/results\u{0}x"}))
            .expect_err("refused");
        assert_eq!(error.field, "path");
        assert!(error.to_string().contains("control character"), "{error}");
        if let Some(camera) = registry.get("source.ip_camera") {
            for params in [
                serde_json::json!({"url": "rtsp://10.0.0.7/a\u{0}b"}),
                serde_json::json!({"url": "rtsp://10.0.0.7/a", "password": "se\u{0}cret"}),
            ] {
                let error = camera.check_params(&params).expect_err("refused");
                assert!(error.to_string().contains("control character"), "{error}");
                assert!(!error.to_string().contains("cret"), "{error}");
            }
        }
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
