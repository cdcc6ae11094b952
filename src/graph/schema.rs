//! JSON Schemas generated from the code: the graph file model, every operator's parameters and
//! the prediction message that result sinks send.
//! `inspectflow schemas --out schemas/` writes them; a test fails when the checked-in copies are
//! stale, so the published schemas always match what validation enforces.

use std::path::{Path, PathBuf};

use inspectflow_operators::sink::message::PredictionMessage;
use inspectflow_operators::{Registry, simplify_enum_schemas};
use serde_json::{Value, json};

use super::spec::GraphSpec;

/// Schema of the graph model alone (node parameters are any object). Validation checks a file's
/// structure with it, then each node's parameters with its operator's schema.
pub fn graph_structure_schema() -> Value {
    let mut schema = schemars::schema_for!(GraphSpec).to_value();
    simplify_enum_schemas(&mut schema);
    unwrap_optional_objects(&mut schema);
    schema
}

/// schemars writes an optional struct field as `anyOf: [{$ref}, {type: null}]`, which makes a
/// mistake inside it surface only as "not valid under any of the schemas". Graph files omit such
/// fields rather than writing null, so the field's schema becomes the `$ref` itself and errors
/// point at the wrong value inside it.
fn unwrap_optional_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let referenced = map
                .get("anyOf")
                .and_then(Value::as_array)
                .and_then(|options| match options.as_slice() {
                    [reference, null]
                        if null == &json!({"type": "null"}) && reference.get("$ref").is_some() =>
                    {
                        Some(reference.clone())
                    }
                    _ => None,
                });
            if let Some(Value::Object(reference)) = referenced {
                map.remove("anyOf");
                map.extend(reference);
            }
            map.values_mut().for_each(unwrap_optional_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_optional_objects),
        _ => {}
    }
}

/// The published graph schema: the structure plus, for each built-in operator, its parameter
/// schema applied when `op` names it (so editors check parameters as users type).
pub fn published_graph_schema(registry: &Registry) -> Value {
    let mut schema = graph_structure_schema();
    let mut rules = Vec::new();
    for descriptor in registry.iter() {
        let key = format!("op.{}", descriptor.name);
        let mut params = descriptor.params_schema().clone();
        // Definitions of nested types move up to the root so that `$ref`s resolve there.
        if let Some(Value::Object(definitions)) =
            params.as_object_mut().and_then(|p| p.remove("$defs"))
        {
            for (name, definition) in definitions {
                schema["$defs"][name] = definition;
            }
        }
        if let Some(map) = params.as_object_mut() {
            map.remove("$schema");
        }
        schema["$defs"][&key] = params;
        rules.push(json!({
            "if": {"properties": {"op": {"const": descriptor.name}}, "required": ["op"]},
            "then": {"properties": {"params": {"$ref": format!("#/$defs/{key}")}}}
        }));
    }
    schema["$defs"]["NodeSpec"]["allOf"] = Value::Array(rules);
    schema["$id"] = json!("https://inspectflow.dev/schemas/graph.schema.json");
    schema
}

/// Every schema file as (path relative to the schemas directory, pretty JSON text).
pub fn render_all(registry: &Registry) -> Vec<(PathBuf, String)> {
    let pretty = |value: &Value| {
        format!(
            "{}\n",
            serde_json::to_string_pretty(value).unwrap_or_default()
        )
    };
    let mut message = schemars::schema_for!(PredictionMessage).to_value();
    simplify_enum_schemas(&mut message);
    let mut files = vec![
        (
            PathBuf::from("graph.schema.json"),
            pretty(&published_graph_schema(registry)),
        ),
        (
            PathBuf::from("prediction-message.schema.json"),
            pretty(&message),
        ),
    ];
    for descriptor in registry.iter() {
        files.push((
            PathBuf::from("operators").join(format!("{}.schema.json", descriptor.name)),
            pretty(descriptor.params_schema()),
        ));
    }
    files
}

/// Writes every schema under `dir`, removing operator schemas that no longer have an operator.
pub fn write_all(dir: &Path, registry: &Registry) -> std::io::Result<Vec<PathBuf>> {
    let files = render_all(registry);
    let operators_dir = dir.join("operators");
    std::fs::create_dir_all(&operators_dir)?;
    for entry in std::fs::read_dir(&operators_dir)? {
        let path = entry?.path();
        let relative = Path::new("operators").join(path.file_name().unwrap_or_default());
        if !files.iter().any(|(name, _)| *name == relative) {
            std::fs::remove_file(&path)?;
        }
    }
    let mut written = Vec::new();
    for (relative, text) in files {
        let path = dir.join(relative);
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// Schema files under `dir` that differ from (or are missing compared with) the generated ones.
pub fn stale_files(dir: &Path, registry: &Registry) -> Vec<PathBuf> {
    let mut stale: Vec<PathBuf> = render_all(registry)
        .into_iter()
        .filter(|(relative, text)| {
            std::fs::read_to_string(dir.join(relative)).ok().as_deref() != Some(text.as_str())
        })
        .map(|(relative, _)| relative)
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir.join("operators")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(op) = name.strip_suffix(".schema.json")
                && registry.get(op).is_none()
            {
                stale.push(Path::new("operators").join(name));
            }
        }
    }
    stale
}
