//! Key paths (`cloud.url`, `uplink[2].qos`) and the file lines they stand on.

use std::fmt;
use std::ops::Range;

use toml_edit::{ArrayOfTables, ImDocument, Item, TableLike, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    /// 0-based; shown 1-based.
    Index(usize),
}

/// Where a setting lives in the file, as the user would name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

impl KeyPath {
    pub fn key(&self, key: &str) -> KeyPath {
        self.with(Segment::Key(key.to_owned()))
    }

    /// `index` is 0-based.
    pub fn index(&self, index: usize) -> KeyPath {
        self.with(Segment::Index(index))
    }

    fn with(&self, segment: Segment) -> KeyPath {
        let mut segments = self.0.clone();
        segments.push(segment);
        KeyPath(segments)
    }

    /// The table an unknown key was found in: its path without indexes, e.g. `uplink`
    /// for `uplink[2].topik`.
    pub fn table_name(&self) -> String {
        let keys: Vec<&str> = self
            .0
            .iter()
            .rev()
            .skip(1)
            .filter_map(|s| match s {
                Segment::Key(k) => Some(k.as_str()),
                Segment::Index(_) => None,
            })
            .collect();
        keys.into_iter().rev().collect::<Vec<_>>().join(".")
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
                Segment::Index(index) => write!(f, "[{}]", index + 1)?,
            }
        }
        Ok(())
    }
}

/// Converts the path serde reported (an unknown key or a wrong type) to ours.
impl From<&serde_path_to_error::Path> for KeyPath {
    fn from(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment as S;
        KeyPath(
            path.iter()
                .filter_map(|segment| match segment {
                    S::Seq { index } => Some(Segment::Index(*index)),
                    S::Map { key } => Some(Segment::Key(key.clone())),
                    S::Enum { .. } | S::Unknown => None,
                })
                .collect(),
        )
    }
}

impl From<&serde_ignored::Path<'_>> for KeyPath {
    fn from(path: &serde_ignored::Path<'_>) -> Self {
        use serde_ignored::Path as P;
        match path {
            P::Root => KeyPath::default(),
            P::Seq { parent, index } => KeyPath::from(*parent).index(*index),
            P::Map { parent, key } => KeyPath::from(*parent).key(key),
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                KeyPath::from(*parent)
            }
        }
    }
}

/// The 1-based line of the key at `path`; when the key is not in the file, the line of
/// the nearest table that is (its header), else line 1.
pub fn line_of(doc: &ImDocument<&str>, path: &KeyPath) -> usize {
    let mut node = Node::of_item(doc.as_item());
    let mut found = None;
    for segment in &path.0 {
        let Some((span, next)) = node.step(segment) else {
            break;
        };
        found = span.or(found);
        node = next;
    }
    found.map_or(1, |span| line_at(doc.raw(), span.start))
}

/// The 1-based line holding byte `offset` of `text`.
pub fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A place in the document that a key path can step into.
enum Node<'a> {
    Table(&'a dyn TableLike),
    Tables(&'a ArrayOfTables),
    Values(&'a toml_edit::Array),
    Leaf,
}

impl<'a> Node<'a> {
    fn of_item(item: &'a Item) -> Self {
        match item {
            Item::Table(table) => Node::Table(table),
            Item::ArrayOfTables(tables) => Node::Tables(tables),
            Item::Value(value) => Node::of_value(value),
            Item::None => Node::Leaf,
        }
    }

    fn of_value(value: &'a Value) -> Self {
        match value {
            Value::InlineTable(table) => Node::Table(table),
            Value::Array(values) => Node::Values(values),
            _ => Node::Leaf,
        }
    }

    fn step(&self, segment: &Segment) -> Option<(Option<Range<usize>>, Node<'a>)> {
        match (self, segment) {
            (Node::Table(table), Segment::Key(key)) => {
                let (key, item) = table.get_key_value(key)?;
                Some((key.span(), Node::of_item(item)))
            }
            (Node::Tables(tables), Segment::Index(index)) => {
                let table = tables.get(*index)?;
                Some((table.span(), Node::Table(table)))
            }
            (Node::Values(values), Segment::Index(index)) => {
                let value = values.get(*index)?;
                Some((value.span(), Node::of_value(value)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# comment
[gateway]
id = "gw"

[cloud]
url = "mqtt://x"
tls = { ca = "a", cert = "b" }

[[uplink]]
topic = "a"

[[uplink]]
topic = "b"
qos = 1
list = [1,
  2]
"#;

    fn line(path: KeyPath) -> usize {
        let doc = ImDocument::parse(TEXT).expect("test document parses");
        line_of(&doc, &path)
    }

    #[test]
    fn lines_of_keys_tables_and_array_items() {
        let root = KeyPath::default();
        assert_eq!(line(root.key("gateway").key("id")), 3);
        assert_eq!(line(root.key("cloud").key("url")), 6);
        assert_eq!(line(root.key("cloud").key("tls").key("cert")), 7);
        assert_eq!(line(root.key("uplink").index(0).key("topic")), 10);
        assert_eq!(line(root.key("uplink").index(1).key("qos")), 14);
        assert_eq!(line(root.key("uplink").index(1).key("list").index(1)), 16);
    }

    #[test]
    fn missing_keys_fall_back_to_their_table_or_line_one() {
        let root = KeyPath::default();
        assert_eq!(line(root.key("gateway").key("data_dir")), 2);
        assert_eq!(line(root.key("uplink").index(1).key("remote_prefix")), 12);
        assert_eq!(line(root.key("queue").key("max_size")), 1);
    }

    #[test]
    fn display_counts_from_one_and_quotes_odd_keys() {
        let root = KeyPath::default();
        assert_eq!(
            root.key("uplink").index(1).key("qos").to_string(),
            "uplink[2].qos"
        );
        assert_eq!(root.key("cloud").key("a.b").to_string(), r#"cloud."a.b""#);
        assert_eq!(
            root.key("uplink").index(1).key("qos").table_name(),
            "uplink"
        );
        assert_eq!(root.key("modbus").table_name(), "");
    }
}
