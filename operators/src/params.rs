//! File and folder parameters, declared as such. An operator marks each parameter that names a
//! file or folder with `#[schemars(with = "FileParam")]` (or `Vec<FileParam>`,
//! `Option<FileParam>`); its JSON Schema then says `"format": "path"`, and
//! [`file_parameters`] finds every such value in a node's parameters from the schema alone. The
//! engine confines them all with one function (the server's path roots), so no operator can
//! forget a parameter, and a new operator gets the check by declaring its type.

use std::borrow::Cow;

use serde_json::Value;

/// The JSON Schema `format` of file and folder parameters.
pub const PATH_FORMAT: &str = "path";

/// Schema marker for a parameter that names a file or folder (the field's Rust type stays
/// `PathBuf`): `{"type": "string", "format": "path", "minLength": 1}`.
pub struct FileParam;

impl schemars::JsonSchema for FileParam {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "FileParam".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": PATH_FORMAT,
            "minLength": 1,
        })
    }
}

/// One step from a parameter object to a file parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamStep {
    /// A named field of an object.
    Field(String),
    /// Every item of an array.
    EachItem,
}

/// Where file parameters sit in an operator's parameters, e.g. `[Field("tls"), Field("ca_file")]`.
pub type ParamPath = Vec<ParamStep>;

/// Deepest schema nesting looked into (schemas are ours, this only guards against a recursive one).
const MAX_SCHEMA_DEPTH: usize = 16;

/// The places of every `format: path` value that `schema` allows, found once per operator.
pub fn file_parameter_paths(schema: &Value) -> Vec<ParamPath> {
    let mut found = Vec::new();
    walk_schema(schema, schema, &mut Vec::new(), &mut found, 0);
    found
}

fn walk_schema(
    root: &Value,
    schema: &Value,
    here: &mut ParamPath,
    found: &mut Vec<ParamPath>,
    depth: usize,
) {
    if depth > MAX_SCHEMA_DEPTH {
        return;
    }
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str)
        && let Some(target) = reference
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer))
    {
        walk_schema(root, target, here, found, depth + 1);
    }
    if schema.get("format").and_then(Value::as_str) == Some(PATH_FORMAT) && !found.contains(here) {
        found.push(here.clone());
    }
    for combinator in ["anyOf", "oneOf", "allOf"] {
        for alternative in schema
            .get(combinator)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            walk_schema(root, alternative, here, found, depth + 1);
        }
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            here.push(ParamStep::Field(name.clone()));
            walk_schema(root, property, here, found, depth + 1);
            here.pop();
        }
    }
    if let Some(items) = schema.get("items") {
        here.push(ParamStep::EachItem);
        walk_schema(root, items, here, found, depth + 1);
        here.pop();
    }
}

/// Every file parameter present in `params`: its dotted field name (`tls.ca_file`,
/// `paths[2]`) and its value.
pub fn file_parameters<'a>(paths: &[ParamPath], params: &'a Value) -> Vec<(String, &'a str)> {
    let mut values = Vec::new();
    for path in paths {
        let mut reached: Vec<(String, &Value)> = vec![(String::new(), params)];
        for step in path {
            reached = reached
                .into_iter()
                .flat_map(|(field, value)| -> Vec<(String, &Value)> {
                    match (step, value) {
                        (ParamStep::Field(name), Value::Object(map)) => map
                            .get(name)
                            .map(|child| {
                                let field = if field.is_empty() {
                                    name.clone()
                                } else {
                                    format!("{field}.{name}")
                                };
                                (field, child)
                            })
                            .into_iter()
                            .collect(),
                        (ParamStep::EachItem, Value::Array(items)) => items
                            .iter()
                            .enumerate()
                            .map(|(index, item)| (format!("{field}[{index}]"), item))
                            .collect(),
                        _ => Vec::new(),
                    }
                })
                .collect();
        }
        values.extend(
            reached
                .into_iter()
                .filter_map(|(field, value)| value.as_str().map(|text| (field, text))),
        );
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;

    #[test]
    fn every_file_parameter_of_the_builtin_operators_is_declared() {
        let registry = Registry::builtin();
        let declared = |name: &str| -> Vec<String> {
            let descriptor = registry.get(name).expect("registered");
            descriptor
                .file_parameter_paths()
                .iter()
                .map(|path| {
                    path.iter()
                        .map(|step| match step {
                            ParamStep::Field(name) => name.clone(),
                            ParamStep::EachItem => "[]".into(),
                        })
                        .collect::<Vec<_>>()
                        .join(".")
                })
                .collect()
        };
        assert_eq!(declared("source.files"), ["paths.[]"]);
        assert_eq!(declared("source.images_folder"), ["path"]);
        assert_eq!(declared("infer.openvino"), ["model"]);
        assert_eq!(declared("anomaly"), ["model"]);
        assert_eq!(declared("sink.folder"), ["path"]);
        assert_eq!(declared("sink.mqtt"), ["tls.ca_file"]);
        assert!(declared("heatmap").is_empty());
    }

    #[test]
    fn finds_the_values_with_their_field_names() {
        let registry = Registry::builtin();
        let files = registry.get("source.files").expect("registered");
        let params = serde_json::json!({"paths": ["a.png", "b.png"]});
        assert_eq!(
            file_parameters(files.file_parameter_paths(), &params),
            [
                ("paths[0]".to_string(), "a.png"),
                ("paths[1]".to_string(), "b.png")
            ]
        );
        let mqtt = registry.get("sink.mqtt").expect("registered");
        let params = serde_json::json!({"host": "h", "topic": "t", "tls": {"ca_file": "/ca.pem"}});
        assert_eq!(
            file_parameters(mqtt.file_parameter_paths(), &params),
            [("tls.ca_file".to_string(), "/ca.pem")]
        );
    }
}
