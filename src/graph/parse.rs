//! Reading graph files: YAML or JSON into a `serde_json::Value`, plus the line and column of every
//! key and sequence item, so that validation errors can point at the place in the file.
//!
//! YAML goes through yaml-rust2's event parser (which reports positions); JSON through serde_json
//! (exact JSON semantics and errors), with positions from the YAML parser, which reads JSON too.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Number, Value};
use yaml_rust2::Yaml;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::limits::{GraphLimits, exceeded};
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

/// Reads and parses a graph file; `.json` files are parsed as JSON, anything else as YAML. A file
/// larger than the limit is not read past it.
pub fn read_file(path: &Path, limits: &GraphLimits) -> Result<Document, GraphErrors> {
    use std::io::Read;
    let file = path.display().to_string();
    let fail = |message: String| GraphErrors(vec![GraphError::in_file(&file, message)]);
    let opened =
        std::fs::File::open(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
    let mut bytes = Vec::new();
    opened
        .take(limits.max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read the file: {e}")))?;
    limits.check_size(bytes.len()).map_err(fail)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        fail(format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let is_json = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
    parse_text(&file, &text, is_json, limits)
}

/// Parses graph text. `file` names it in errors.
pub fn parse_text(
    file: &str,
    text: &str,
    is_json: bool,
    limits: &GraphLimits,
) -> Result<Document, GraphErrors> {
    let in_file = |message: String| GraphErrors(vec![GraphError::in_file(file, message)]);
    limits.check_size(text.len()).map_err(in_file)?;
    if is_json {
        // serde_json refuses nesting deeper than 128 levels by itself; the walk below holds the
        // value to the configured limits.
        let value: Value = serde_json::from_str(text).map_err(|e| {
            GraphErrors(vec![GraphError {
                line: Some(e.line()),
                column: Some(e.column()),
                ..GraphError::in_file(file, format!("invalid JSON: {e}"))
            }])
        })?;
        check_json_limits(&value, limits).map_err(in_file)?;
        // JSON is YAML too; when the YAML reader copes, it supplies positions.
        let locations = parse_yaml(text, limits)
            .map(|(_, locations)| locations)
            .unwrap_or_default();
        return Ok(Document {
            file: file.to_string(),
            value,
            locations,
        });
    }
    let (value, locations) = parse_yaml(text, limits).map_err(|(message, line, column)| {
        GraphErrors(vec![GraphError {
            line: Some(line),
            column: Some(column),
            ..GraphError::in_file(file, message)
        }])
    })?;
    Ok(Document {
        file: file.to_string(),
        value,
        locations,
    })
}

/// Bytes of text that count as one value: a long string weighs as much as the values its
/// bytes could have held, so aliases copying one cannot multiply a document's memory.
const BYTES_PER_VALUE: usize = 64;

/// How many values a scalar of `text` counts as (one per [`BYTES_PER_VALUE`] bytes, at least
/// one).
fn scalar_weight(text: &str) -> usize {
    1 + text.len() / BYTES_PER_VALUE
}

/// Holds a parsed JSON value to the depth and value-count limits (without recursion).
fn check_json_limits(value: &Value, limits: &GraphLimits) -> Result<(), String> {
    let mut pending: Vec<(&Value, usize)> = vec![(value, 1)];
    let mut count = 0usize;
    while let Some((value, depth)) = pending.pop() {
        count += 1;
        if count > limits.max_values {
            return Err(exceeded("values", limits.max_values, "--graph-max-values"));
        }
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        if depth > limits.max_depth {
            return Err(exceeded(
                "levels of nesting",
                limits.max_depth,
                "--graph-max-depth",
            ));
        }
        pending.extend(children.map(|child| (child, depth + 1)));
    }
    Ok(())
}

type YamlError = (String, usize, usize);

/// Bytes of JSON pointers kept for error positions; past it, errors point at the nearest
/// recorded ancestor. (Pointers repeat their ancestors' keys, so without a budget a document of
/// long keys nested deeply could make them far larger than the document.)
const LOCATION_BUDGET_BYTES: usize = 32 << 20;

/// Parses one YAML document, driving the event parser in a loop (yaml-rust2's own loader
/// recurses once per nesting level, which a hostile document turns into a stack overflow) and
/// stopping at the first error or exceeded limit.
fn parse_yaml(text: &str, limits: &GraphLimits) -> Result<(Value, Locations), YamlError> {
    let drive = || {
        let mut builder = TreeBuilder::new(limits);
        let mut parser = Parser::new_from_str(text);
        loop {
            let (event, mark) = parser.next_token().map_err(|e| {
                (
                    format!("invalid YAML: {}", e.info()),
                    e.marker().line(),
                    e.marker().col() + 1,
                )
            })?;
            if event == Event::StreamEnd {
                break;
            }
            builder.on_event(event, mark);
            if let Some(error) = builder.error.take() {
                return Err(error);
            }
        }
        Ok((builder.root.unwrap_or(Value::Null), builder.locations))
    };
    // The scanner is third-party code fed hostile input: a panic inside it is a bad document,
    // not a reason to take the server down.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(drive))
        .unwrap_or_else(|_| Err(("invalid YAML: the parser failed on this input".into(), 1, 1)))
}

enum Container {
    Mapping {
        pointer: String,
        map: Map<String, Value>,
        pending_key: Option<String>,
        anchor: usize,
        values: usize,
    },
    Sequence {
        pointer: String,
        items: Vec<Value>,
        anchor: usize,
        values: usize,
    },
}

/// Builds a `Value` from parser events, recording positions and holding the document to its
/// limits.
struct TreeBuilder<'a> {
    limits: &'a GraphLimits,
    stack: Vec<Container>,
    root: Option<Value>,
    /// Anchored values with the number of values each holds.
    anchors: HashMap<usize, (Value, usize)>,
    locations: Locations,
    location_bytes: usize,
    documents: usize,
    values: usize,
    alias_values: usize,
    error: Option<YamlError>,
}

fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

impl<'a> TreeBuilder<'a> {
    fn new(limits: &'a GraphLimits) -> Self {
        Self {
            limits,
            stack: Vec::new(),
            root: None,
            anchors: HashMap::new(),
            locations: Locations::default(),
            location_bytes: 0,
            documents: 0,
            values: 0,
            alias_values: 0,
            error: None,
        }
    }

    /// Records a YAML problem (the first problem wins).
    fn fail(&mut self, message: String, mark: Marker) {
        self.stop_at(format!("invalid YAML: {message}"), mark);
    }

    /// Records an exceeded limit (the first problem wins).
    fn stop_at(&mut self, message: String, mark: Marker) {
        if self.error.is_none() {
            self.error = Some((message, mark.line(), mark.col() + 1));
        }
    }

    fn record_location(&mut self, pointer: String, position: (usize, usize)) {
        if self.location_bytes + pointer.len() <= LOCATION_BUDGET_BYTES {
            self.location_bytes += pointer.len();
            self.locations.by_pointer.entry(pointer).or_insert(position);
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

    /// Counts `count` more values; false (with the error set) past the limit.
    fn count_values(&mut self, count: usize, mark: Marker) -> bool {
        self.values = self.values.saturating_add(count);
        if self.values > self.limits.max_values {
            self.stop_at(
                exceeded("values", self.limits.max_values, "--graph-max-values"),
                mark,
            );
            return false;
        }
        true
    }

    /// Places a finished value holding `count` values (itself included).
    fn place(&mut self, value: Value, count: usize, anchor: usize, mark: Marker) {
        // An anchored value is held twice (in the document and for its aliases): nested
        // anchors would otherwise hold a copy of the document per level.
        if anchor > 0 {
            if !self.count_values(count, mark) {
                return;
            }
            self.anchors.insert(anchor, (value.clone(), count));
        }
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Container::Sequence { items, values, .. }) => {
                *values += count;
                items.push(value);
            }
            Some(Container::Mapping {
                map,
                pending_key,
                values,
                ..
            }) => {
                *values += count;
                if let Some(key) = pending_key.take()
                    && map.insert(key.clone(), value).is_some()
                {
                    self.fail(format!("duplicate key '{key}'"), mark);
                }
            }
        }
    }

    fn on_event(&mut self, event: Event, mark: Marker) {
        let position = (mark.line(), mark.col() + 1);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let weight = scalar_weight(&text);
                if !self.count_values(weight, mark) {
                    return;
                }
                if self.expecting_key() {
                    let pointer = format!(
                        "{}/{}",
                        self.child_pointer().trim_end_matches('/'),
                        escape(&text)
                    );
                    self.record_location(pointer, position);
                    if let Some(Container::Mapping { pending_key, .. }) = self.stack.last_mut() {
                        *pending_key = Some(text);
                    }
                    return;
                }
                if matches!(self.stack.last(), Some(Container::Sequence { .. })) {
                    let pointer = self.child_pointer();
                    self.record_location(pointer, position);
                }
                let value = if style == TScalarStyle::Plain {
                    plain_scalar(&text)
                } else {
                    Value::String(text)
                };
                self.place(value, weight, anchor, mark);
            }
            Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                if self.expecting_key() {
                    self.fail("only plain keys are supported".into(), mark);
                    return;
                }
                if self.stack.len() >= self.limits.max_depth {
                    self.stop_at(
                        exceeded(
                            "levels of nesting",
                            self.limits.max_depth,
                            "--graph-max-depth",
                        ),
                        mark,
                    );
                    return;
                }
                if !self.count_values(1, mark) {
                    return;
                }
                let pointer = self.child_pointer();
                self.record_location(pointer.clone(), position);
                self.stack
                    .push(if matches!(event, Event::MappingStart(..)) {
                        Container::Mapping {
                            pointer,
                            map: Map::new(),
                            pending_key: None,
                            anchor,
                            values: 1,
                        }
                    } else {
                        Container::Sequence {
                            pointer,
                            items: Vec::new(),
                            anchor,
                            values: 1,
                        }
                    });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let (value, count, anchor) = match self.stack.pop() {
                    Some(Container::Mapping {
                        map,
                        anchor,
                        values,
                        ..
                    }) => (Value::Object(map), values, anchor),
                    Some(Container::Sequence {
                        items,
                        anchor,
                        values,
                        ..
                    }) => (Value::Array(items), values, anchor),
                    None => return,
                };
                self.place(value, count, anchor, mark);
            }
            Event::Alias(anchor) => {
                let Some((value, count)) = self.anchors.get(&anchor).cloned() else {
                    self.fail("unknown alias".into(), mark);
                    return;
                };
                if self.expecting_key() {
                    self.fail("aliases cannot be keys".into(), mark);
                    return;
                }
                self.alias_values = self.alias_values.saturating_add(count);
                if self.alias_values > self.limits.max_alias_values {
                    self.stop_at(
                        exceeded(
                            "values copied by aliases",
                            self.limits.max_alias_values,
                            "--graph-max-alias-values",
                        ),
                        mark,
                    );
                    return;
                }
                if self.count_values(count, mark) {
                    self.place(value, count, 0, mark);
                }
            }
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(
                        "a graph file holds one YAML document; found a second".into(),
                        mark,
                    );
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
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
        let from_yaml =
            parse_text("a.yaml", yaml, false, &GraphLimits::DEFAULT).expect("yaml parses");
        let from_json =
            parse_text("a.json", json, true, &GraphLimits::DEFAULT).expect("json parses");
        assert_eq!(from_yaml.value, from_json.value);
    }

    #[test]
    fn records_positions_of_keys_and_items() {
        let yaml = "nodes:\n  - id: a\n    op: x\n    params:\n      width: 3\n";
        let doc = parse_text("a.yaml", yaml, false, &GraphLimits::DEFAULT).expect("parses");
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
        let error = parse_text(
            "bad.yaml",
            "nodes:\n  - id: [a\n",
            false,
            &GraphLimits::DEFAULT,
        )
        .err()
        .expect("fails")
        .0
        .remove(0);
        assert_eq!(error.file, "bad.yaml");
        assert!(error.line.is_some());
    }

    #[test]
    fn rejects_duplicate_keys() {
        let error = parse_text(
            "dup.yaml",
            "name: a\nname: b\nnodes: []\n",
            false,
            &GraphLimits::DEFAULT,
        )
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
        let doc = parse_text("a.yaml", yaml, false, &GraphLimits::DEFAULT).expect("parses");
        assert_eq!(doc.value["copy"]["width"], 8);
    }

    #[test]
    fn nesting_aliases_and_values_stop_at_their_limits() {
        let limits = GraphLimits {
            max_depth: 8,
            max_alias_values: 20,
            max_values: 50,
            ..GraphLimits::DEFAULT
        };
        let deep = format!("nodes:\n  - {}x\n", "- ".repeat(10_000));
        let error = parse_text("deep.yaml", &deep, false, &limits)
            .err()
            .expect("too deep")
            .0
            .remove(0);
        assert!(
            error.message.contains("more than 8 levels"),
            "{}",
            error.message
        );
        assert!(
            error.message.contains("--graph-max-depth"),
            "{}",
            error.message
        );
        assert_eq!(error.line, Some(2));

        let bomb = "a: &a [x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a]\nc: [*b, *b]\n";
        let error = parse_text("bomb.yaml", bomb, false, &limits)
            .err()
            .expect("too many alias copies")
            .0
            .remove(0);
        assert!(
            error.message.contains("copied by aliases"),
            "{}",
            error.message
        );

        let many = format!("items: [{}]\n", vec!["1"; 60].join(", "));
        let error = parse_text("many.yaml", &many, false, &limits)
            .err()
            .expect("too many values")
            .0
            .remove(0);
        assert!(
            error.message.contains("more than 50 values"),
            "{}",
            error.message
        );
        let json = format!("{{\"items\": [{}]}}", vec!["1"; 60].join(", "));
        assert!(parse_text("many.json", &json, true, &limits).is_err());

        // A long string copied by aliases weighs by its bytes, and nested anchors count the
        // copies they hold.
        let long = format!("a: &s {}\nb: [*s, *s, *s]\n", "x".repeat(600));
        let error = parse_text("long.yaml", &long, false, &limits)
            .err()
            .expect("a long string copied")
            .0
            .remove(0);
        assert!(
            error.message.contains("copied by aliases"),
            "{}",
            error.message
        );
        let anchored: String = (1..=7).map(|level| format!("&n{level} [")).collect();
        let nested = format!("a: {anchored}1, 2, 3, 4, 5{}\n", "]".repeat(7));
        let error = parse_text("nested.yaml", &nested, false, &limits)
            .err()
            .expect("seven nested anchors hold seven copies")
            .0
            .remove(0);
        assert!(
            error.message.contains("more than 50 values"),
            "{}",
            error.message
        );
        let plain = format!("a: {}1, 2, 3, 4, 5{}\n", "[".repeat(7), "]".repeat(7));
        assert!(parse_text("plain.yaml", &plain, false, &limits).is_ok());

        let two = "nodes: []\n---\nnodes: []\n";
        assert!(parse_text("two.yaml", two, false, &limits).is_err());
    }
}
