//! The subscriptions of persistent sessions as a tree of topic levels, so that a message is
//! matched against all of them in one walk where it enters the broker.

use std::collections::HashMap;
use std::sync::Arc;

/// Filters (at QoS 1 or 2) of the persistent sessions the gateway keeps.
#[derive(Debug, Default)]
pub struct FilterTree {
    root: Node,
    len: usize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<String, Node>,
    plus: Option<Box<Node>>,
    /// Sessions subscribed with `#` at this level (matches this level and below).
    hash: Vec<(Arc<str>, u8)>,
    /// Sessions whose filter ends exactly here.
    here: Vec<(Arc<str>, u8)>,
}

/// Filters deeper than this are not kept: matching walks the tree recursively, and a
/// device must not be able to make that walk (or the tree's drop) deep enough to
/// overflow a stack. MQTT gives a topic up to 32k levels; no real one needs 128.
pub const MAX_LEVELS: usize = 128;

impl FilterTree {
    /// False (and nothing kept) for a filter of more than [`MAX_LEVELS`] levels.
    pub fn insert(&mut self, filter: &str, session: Arc<str>, qos: u8) -> bool {
        if filter.split('/').nth(MAX_LEVELS).is_some() {
            return false;
        }
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                node.hash.push((session, qos));
                self.len += 1;
                return true;
            }
            node = match level {
                "+" => node.plus.get_or_insert_with(Box::default),
                _ => node.children.entry(level.to_owned()).or_default(),
            };
        }
        node.here.push((session, qos));
        self.len += 1;
        true
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every session one of whose filters matches `topic`, once, with the highest QoS of
    /// its matching filters (appended to `out`, which is cleared first).
    pub fn matches(&self, topic: &str, out: &mut Vec<(Arc<str>, u8)>) {
        out.clear();
        if self.is_empty() {
            return;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        // Wildcards at the first level never match topics starting with `$`.
        let system = topic.starts_with('$');
        walk(&self.root, &levels, system, out);
        if out.len() > 1 {
            out.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            out.dedup_by(|later, first| later.0 == first.0);
        }
    }
}

fn walk(node: &Node, levels: &[&str], system: bool, out: &mut Vec<(Arc<str>, u8)>) {
    if !system {
        out.extend(node.hash.iter().cloned());
    }
    let Some((level, rest)) = levels.split_first() else {
        out.extend(node.here.iter().cloned());
        return;
    };
    if let (false, Some(plus)) = (system, &node.plus) {
        walk(plus, rest, false, out);
    }
    if let Some(child) = node.children.get(*level) {
        walk(child, rest, false, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(tree: &FilterTree, topic: &str) -> Vec<(String, u8)> {
        let mut out = Vec::new();
        tree.matches(topic, &mut out);
        out.into_iter().map(|(s, q)| (s.to_string(), q)).collect()
    }

    #[test]
    fn matches_like_mqtt() {
        let mut tree = FilterTree::default();
        tree.insert("a/+/c", "s1".into(), 1);
        tree.insert("a/#", "s2".into(), 1);
        tree.insert("a/b/c", "s2".into(), 2);
        tree.insert("#", "s3".into(), 1);
        tree.insert("$SYS/x", "s4".into(), 1);
        assert_eq!(
            sessions(&tree, "a/b/c"),
            [("s1".into(), 1), ("s2".into(), 2), ("s3".into(), 1)]
        );
        assert_eq!(sessions(&tree, "a"), [("s2".into(), 1), ("s3".into(), 1)]);
        assert_eq!(sessions(&tree, "b"), [("s3".into(), 1)]);
        assert_eq!(sessions(&tree, "$SYS/x"), [("s4".into(), 1)]);
        assert!(sessions(&FilterTree::default(), "a").is_empty());
    }

    #[test]
    fn a_filter_too_deep_to_walk_is_not_kept() {
        let mut tree = FilterTree::default();
        let deep = vec!["+"; 30_000].join("/");
        assert!(!tree.insert(&deep, "s1".into(), 1));
        assert!(tree.is_empty());
        let topic = vec!["a"; 30_000].join("/");
        assert!(sessions(&tree, &topic).is_empty());
        let deepest = vec!["+"; MAX_LEVELS].join("/");
        assert!(tree.insert(&deepest, "s1".into(), 1));
        let topic = vec!["a"; MAX_LEVELS].join("/");
        assert_eq!(sessions(&tree, &topic), [("s1".into(), 1)]);
    }
}
