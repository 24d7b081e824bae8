//! A YAML document tree that keeps the line of every node and every key of a mapping,
//! duplicates included.
//!
//! serde-based YAML decoders either reject duplicate keys or drop them and lose the line of
//! each value. arcfleet needs both: inventory and playbook errors name `file:line`, and the
//! K3s configuration model must see duplicated keys in order, the way K3s's lenient decoder
//! does.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One node of a YAML document with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The node's content.
    pub value: Value,
    /// 1-based line of the node's first character.
    pub line: usize,
    /// 1-based column of the node's first character.
    pub col: usize,
}

/// Content of a YAML node.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar as written, with whether it was quoted (a quoted scalar is always a string).
    Scalar { text: String, quoted: bool },
    /// A sequence of nodes.
    Seq(Vec<Node>),
    /// A mapping, in document order, keeping duplicate keys.
    Map(Vec<(Node, Node)>),
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line} column {col}: {message}")]
pub struct SyntaxError {
    /// 1-based line of the error.
    pub line: usize,
    /// 1-based column of the error.
    pub col: usize,
    /// What the scanner or parser reported.
    pub message: String,
}

impl Node {
    /// Returns the scalar text, or `None` when the node is a sequence or mapping.
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Returns whether the node is a plain `null`, `~` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, quoted: false }
            if text.is_empty() || text == "~" || text == "null" || text == "Null" || text == "NULL")
    }

    /// Returns a short name of the node's kind for error messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar { .. } if self.is_null() => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Upper bound on nodes in one document, aliases counted once per use. Inventories,
/// playbooks and K3s configs stay far below it; a document of nested aliases (a "billion
/// laughs" file) would otherwise expand past any memory.
const MAX_NODES: usize = 1_000_000;

/// Parses the first document of `text`. Returns `None` for an empty document.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|error| SyntaxError {
            line: error.marker().line(),
            col: error.marker().col() + 1,
            message: error.info().to_owned(),
        })?;
    if let Some(line) = builder.overflow_line {
        return Err(SyntaxError {
            line,
            col: 1,
            message: format!(
                "the document expands to more than {MAX_NODES} nodes through aliases; \
                 write the values out instead of nesting aliases"
            ),
        });
    }
    Ok(builder.root)
}

/// Counts the nodes in a tree.
fn size(node: &Node) -> usize {
    1 + match &node.value {
        Value::Scalar { .. } => 0,
        Value::Seq(items) => items.iter().map(size).sum(),
        Value::Map(entries) => entries.iter().map(|(k, v)| size(k) + size(v)).sum(),
    }
}

/// Containers that are still open while events arrive.
enum Open {
    Seq(Node),
    /// A mapping and the key that waits for its value.
    Map(Node, Option<Node>),
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Open>,
    anchors: HashMap<usize, (Node, usize)>,
    /// Anchor ids of the open containers, parallel to `stack`.
    open_anchors: Vec<usize>,
    root: Option<Node>,
    /// Nodes built so far, alias expansions included.
    nodes: usize,
    /// The line where the node budget ran out, if it did.
    overflow_line: Option<usize>,
}

impl TreeBuilder {
    fn push_node(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            let nodes = size(&node);
            self.anchors.insert(anchor, (node.clone(), nodes));
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Open::Seq(seq)) => {
                if let Value::Seq(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some(Open::Map(map, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => {
                    if let Value::Map(entries) = &mut map.value {
                        entries.push((key, node));
                    }
                }
            },
        }
    }

    fn close(&mut self) {
        let Some(open) = self.stack.pop() else { return };
        let anchor = self.open_anchors.pop().unwrap_or(0);
        let node = match open {
            Open::Seq(node) | Open::Map(node, _) => node,
        };
        self.push_node(node, anchor);
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.overflow_line.is_some() {
            return;
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            self.overflow_line = Some(mark.line());
            return;
        }
        let at = |value| Node {
            value,
            line: mark.line(),
            col: mark.col() + 1,
        };
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push_node(at(Value::Scalar { text, quoted }), anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Open::Seq(at(Value::Seq(Vec::new()))));
                self.open_anchors.push(anchor);
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push(Open::Map(at(Value::Map(Vec::new())), None));
                self.open_anchors.push(anchor);
            }
            Event::SequenceEnd | Event::MappingEnd => self.close(),
            Event::Alias(anchor) => {
                let (node, nodes) = self.anchors.get(&anchor).cloned().unwrap_or_else(|| {
                    let empty = Value::Scalar {
                        text: String::new(),
                        quoted: false,
                    };
                    (at(empty), 1)
                });
                self.nodes += nodes;
                if self.nodes > MAX_NODES {
                    self.overflow_line = Some(mark.line());
                    return;
                }
                self.push_node(node, 0);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(node: &Node) -> Vec<(String, usize)> {
        let Value::Map(entries) = &node.value else {
            panic!("not a mapping: {node:?}");
        };
        entries
            .iter()
            .map(|(key, _)| (key.as_scalar().unwrap_or("").to_owned(), key.line))
            .collect()
    }

    #[test]
    fn duplicate_keys_are_kept_in_order() {
        let root = parse("a: 1\nb: 2\na: 3\n").unwrap().unwrap();
        assert_eq!(
            entries(&root),
            vec![("a".into(), 1), ("b".into(), 2), ("a".into(), 3)]
        );
    }

    #[test]
    fn quoted_scalars_are_marked() {
        let root = parse("mode: \"0640\"\nplain: 0640\n").unwrap().unwrap();
        let Value::Map(entries) = root.value else {
            panic!()
        };
        assert_eq!(
            entries[0].1.value,
            Value::Scalar {
                text: "0640".into(),
                quoted: true
            }
        );
        assert_eq!(
            entries[1].1.value,
            Value::Scalar {
                text: "0640".into(),
                quoted: false
            }
        );
    }

    #[test]
    fn sequence_lines_are_recorded() {
        let root = parse("list:\n  - x\n  - y\n").unwrap().unwrap();
        let Value::Map(entries) = root.value else {
            panic!()
        };
        let Value::Seq(items) = &entries[0].1.value else {
            panic!()
        };
        assert_eq!(items[0].line, 2);
        assert_eq!(items[1].line, 3);
    }

    #[test]
    fn aliases_resolve_to_anchored_node() {
        let root = parse("a: &x [1, 2]\nb: *x\n").unwrap().unwrap();
        let Value::Map(entries) = root.value else {
            panic!()
        };
        assert_eq!(entries[0].1.value, entries[1].1.value);
    }

    #[test]
    fn syntax_error_has_line() {
        let error = parse("a: [1, 2\nb: c\n").unwrap_err();
        assert!(error.line >= 2, "{error}");
    }

    #[test]
    fn alias_bomb_is_rejected() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..12 {
            let previous = format!("*a{}", level - 1);
            let items = [previous.as_str(); 10].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        let error = parse(&text).unwrap_err();
        assert!(error.message.contains("aliases"), "{error}");
    }

    #[test]
    fn byte_order_mark_is_ignored() {
        let root = parse("\u{feff}a: 1\n").unwrap().unwrap();
        let Value::Map(entries) = root.value else {
            panic!()
        };
        assert_eq!(entries[0].0.as_scalar(), Some("a"));
    }

    #[test]
    fn empty_document_is_none() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }
}
