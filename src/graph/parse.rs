//! Reading graph files: YAML or JSON into a `serde_json::Value`, plus the line and column of every
//! key and sequence item, so that validation errors can point at the place in the file.
//!
//! YAML goes through yaml-rust2's event parser (which reports positions); JSON through serde_json
//! (exact JSON semantics and errors), with positions from the YAML parser, which reads JSON too.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Number, Value};
use yaml_rust2::Yaml;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::{GraphError, GraphErrors};

/// A parsed graph document.
pub struct Document {
    /// The file name as given (used in every error).
    pub file: String,
    /// The content.
    pub value: Value,
    /// Positions of keys and items.
    pub locations: Locations,
}

/// Line and column (both 1-based) by JSON pointer (`/nodes/0/params/width`).
#[derive(Default)]
pub struct Locations {
    by_pointer: HashMap<String, (usize, usize)>,
}

impl Locations {
    /// The position of `pointer`, or of its nearest ancestor that has one.
    pub fn find(&self, pointer: &str) -> Option<(usize, usize)> {
        let mut current = pointer;
        loop {
            if let Some(position) = self.by_pointer.get(current) {
                return Some(*position);
            }
            let (parent, _) = current.rsplit_once('/')?;
            current = parent;
        }
    }
}

/// Reads and parses a graph file; `.json` files are parsed as JSON, anything else as YAML.
pub fn read_file(path: &Path) -> Result<Document, GraphErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        GraphErrors(vec![GraphError::in_file(
            &file,
            format!("cannot read the file: {e}"),
        )])
    })?;
    let is_json = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
    parse_text(&file, &text, is_json)
}

/// Parses graph text. `file` names it in errors.
pub fn parse_text(file: &str, text: &str, is_json: bool) -> Result<Document, GraphErrors> {
    if is_json {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            GraphErrors(vec![GraphError {
                line: Some(e.line()),
                column: Some(e.column()),
                ..GraphError::in_file(file, format!("invalid JSON: {e}"))
            }])
        })?;
        // JSON is YAML too; when the YAML reader copes, it supplies positions.
        let locations = parse_yaml(text)
            .map(|(_, locations)| locations)
            .unwrap_or_default();
        return Ok(Document {
            file: file.to_string(),
            value,
            locations,
        });
    }
    let (value, locations) = parse_yaml(text).map_err(|(message, line, column)| {
        GraphErrors(vec![GraphError {
            line: Some(line),
            column: Some(column),
            ..GraphError::in_file(file, format!("invalid YAML: {message}"))
        }])
    })?;
    Ok(Document {
        file: file.to_string(),
        value,
        locations,
    })
}

type YamlError = (String, usize, usize);

fn parse_yaml(text: &str) -> Result<(Value, Locations), YamlError> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, false).map_err(|e| {
        (
            e.info().to_string(),
            e.marker().line(),
            e.marker().col() + 1,
        )
    })?;
    if let Some(error) = builder.error {
        return Err(error);
    }
    let value = builder.root.unwrap_or(Value::Null);
    Ok((value, builder.locations))
}

enum Container {
    Mapping {
        pointer: String,
        map: Map<String, Value>,
        pending_key: Option<String>,
        anchor: usize,
    },
    Sequence {
        pointer: String,
        items: Vec<Value>,
        anchor: usize,
    },
}

/// Builds a `Value` from parser events, recording positions.
#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Container>,
    root: Option<Value>,
    anchors: HashMap<usize, Value>,
    locations: Locations,
    error: Option<YamlError>,
}

fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

impl TreeBuilder {
    fn fail(&mut self, message: String, mark: Marker) {
        if self.error.is_none() {
            self.error = Some((message, mark.line(), mark.col() + 1));
        }
    }

    /// Pointer for a value about to be placed in the current container.
    fn child_pointer(&self) -> String {
        match self.stack.last() {
            None => String::new(),
            Some(Container::Mapping {
                pointer,
                pending_key,
                ..
            }) => format!("{pointer}/{}", escape(pending_key.as_deref().unwrap_or(""))),
            Some(Container::Sequence { pointer, items, .. }) => {
                format!("{pointer}/{}", items.len())
            }
        }
    }

    fn expecting_key(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Container::Mapping {
                pending_key: None,
                ..
            })
        )
    }

    fn place(&mut self, value: Value, anchor: usize, mark: Marker) {
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Container::Sequence { items, .. }) => items.push(value),
            Some(Container::Mapping {
                map, pending_key, ..
            }) => {
                if let Some(key) = pending_key.take()
                    && map.insert(key.clone(), value).is_some()
                {
                    self.fail(format!("duplicate key '{key}'"), mark);
                }
            }
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let position = (mark.line(), mark.col() + 1);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                if self.expecting_key() {
                    let pointer = format!(
                        "{}/{}",
                        self.child_pointer().trim_end_matches('/'),
                        escape(&text)
                    );
                    self.locations.by_pointer.insert(pointer, position);
                    if let Some(Container::Mapping { pending_key, .. }) = self.stack.last_mut() {
                        *pending_key = Some(text);
                    }
                    return;
                }
                if matches!(self.stack.last(), Some(Container::Sequence { .. })) {
                    self.locations
                        .by_pointer
                        .insert(self.child_pointer(), position);
                }
                let value = if style == TScalarStyle::Plain {
                    plain_scalar(&text)
                } else {
                    Value::String(text)
                };
                self.place(value, anchor, mark);
            }
            Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                if self.expecting_key() {
                    self.fail("only plain keys are supported".into(), mark);
                    return;
                }
                let pointer = self.child_pointer();
                self.locations
                    .by_pointer
                    .entry(pointer.clone())
                    .or_insert(position);
                self.stack
                    .push(if matches!(event, Event::MappingStart(..)) {
                        Container::Mapping {
                            pointer,
                            map: Map::new(),
                            pending_key: None,
                            anchor,
                        }
                    } else {
                        Container::Sequence {
                            pointer,
                            items: Vec::new(),
                            anchor,
                        }
                    });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let (value, anchor) = match self.stack.pop() {
                    Some(Container::Mapping { map, anchor, .. }) => (Value::Object(map), anchor),
                    Some(Container::Sequence { items, anchor, .. }) => {
                        (Value::Array(items), anchor)
                    }
                    None => return,
                };
                self.place(value, anchor, mark);
            }
            Event::Alias(anchor) => match self.anchors.get(&anchor).cloned() {
                Some(value) => {
                    if self.expecting_key() {
                        self.fail("aliases cannot be keys".into(), mark);
                    } else {
                        self.place(value, 0, mark);
                    }
                }
                None => self.fail("unknown alias".into(), mark),
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Resolves a plain YAML scalar (YAML 1.2 core schema: null, booleans, integers, floats, strings).
fn plain_scalar(text: &str) -> Value {
    match Yaml::from_str(text) {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Integer(i) => Value::Number(i.into()),
        Yaml::Real(real) => real
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or(Value::String(real)),
        _ => Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_give_the_same_value() {
        let yaml = "nodes:\n  - id: a\n    op: x\n    params: {width: 3, scale: 0.5, on: true, name: 'q'}\n";
        let json = r#"{"nodes": [{"id": "a", "op": "x", "params": {"width": 3, "scale": 0.5, "on": true, "name": "q"}}]}"#;
        let from_yaml = parse_text("a.yaml", yaml, false).expect("yaml parses");
        let from_json = parse_text("a.json", json, true).expect("json parses");
        assert_eq!(from_yaml.value, from_json.value);
    }

    #[test]
    fn records_positions_of_keys_and_items() {
        let yaml = "nodes:\n  - id: a\n    op: x\n    params:\n      width: 3\n";
        let doc = parse_text("a.yaml", yaml, false).expect("parses");
        assert_eq!(doc.locations.find("/nodes/0/params/width"), Some((5, 7)));
        assert_eq!(
            doc.locations.find("/nodes/0").map(|(line, _)| line),
            Some(2)
        );
        // Unknown pointers fall back to the nearest ancestor.
        assert_eq!(
            doc.locations.find("/nodes/0/params/height"),
            doc.locations.find("/nodes/0/params")
        );
    }

    #[test]
    fn reports_yaml_syntax_errors_with_a_line() {
        let error = parse_text("bad.yaml", "nodes:\n  - id: [a\n", false)
            .err()
            .expect("fails")
            .0
            .remove(0);
        assert_eq!(error.file, "bad.yaml");
        assert!(error.line.is_some());
    }

    #[test]
    fn rejects_duplicate_keys() {
        let error = parse_text("dup.yaml", "name: a\nname: b\nnodes: []\n", false)
            .err()
            .expect("fails")
            .0
            .remove(0);
        assert!(
            error.message.contains("duplicate key 'name'"),
            "{}",
            error.message
        );
        assert_eq!(error.line, Some(2));
    }

    #[test]
    fn expands_anchors_and_aliases() {
        let yaml = "base: &size {width: 8}\ncopy: *size\n";
        let doc = parse_text("a.yaml", yaml, false).expect("parses");
        assert_eq!(doc.value["copy"]["width"], 8);
    }
}
