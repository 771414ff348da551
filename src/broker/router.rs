//! The subscription tree: which sessions a topic reaches. One node per filter level, `+`
//! and `#` kept apart from the named levels, shared subscriptions (`$share/GROUP/FILTER`)
//! as groups beside the plain ones. A publish walks only the nodes its topic can reach,
//! without allocating.

use std::collections::HashMap;

use super::codec::SubOptions;
use super::session::SessionKey;

/// Levels a subscription filter may have: the tree is walked recursively, so its depth is
/// bounded (a topic may be deeper; the walk stops where the tree does).
pub const MAX_FILTER_LEVELS: usize = 128;

/// A subscription as the tree keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sub {
    pub session: SessionKey,
    pub options: SubOptions,
    /// MQTT 5 subscription identifier (0: none).
    pub id: u32,
}

/// A filter as a client wrote it, taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter<'a> {
    /// The share name of a `$share/GROUP/FILTER` subscription.
    pub group: Option<&'a str>,
    /// The topic filter proper.
    pub levels: &'a str,
}

impl<'a> Filter<'a> {
    /// Checks a filter ([MQTT-4.7.1-1..3], [MQTT-4.8.2-1..2]); the error says why.
    pub fn parse(filter: &'a str) -> Result<Filter<'a>, &'static str> {
        let (group, levels) = match filter.strip_prefix("$share/") {
            Some(rest) => {
                let (group, levels) = rest
                    .split_once('/')
                    .ok_or("a shared subscription needs $share/GROUP/FILTER")?;
                if group.is_empty() || group.contains(['+', '#']) {
                    return Err(
                        "the share name of a shared subscription is empty or has a wildcard",
                    );
                }
                (Some(group), levels)
            }
            None if filter == "$share" => {
                return Err("a shared subscription needs $share/GROUP/FILTER")
            }
            None => (None, filter),
        };
        if levels.is_empty() {
            return Err("an empty topic filter");
        }
        let mut count = 0;
        let mut parts = levels.split('/').peekable();
        while let Some(level) = parts.next() {
            count += 1;
            match level {
                "#" if parts.peek().is_some() => return Err("'#' that is not the last level"),
                "#" | "+" => {}
                _ if level.contains(['+', '#']) => {
                    return Err("a wildcard that does not stand alone in its level")
                }
                _ => {}
            }
        }
        if count > MAX_FILTER_LEVELS {
            return Err("a topic filter of more than 128 levels");
        }
        Ok(Filter { group, levels })
    }

    pub fn is_shared(&self) -> bool {
        self.group.is_some()
    }
}

#[derive(Debug)]
struct Group {
    name: Box<str>,
    members: Vec<Sub>,
    /// The member that gets the next message (round robin).
    next: usize,
}

/// The subscriptions that end at one place of the tree: plain ones and shared groups.
struct Entries<'a> {
    subs: &'a mut Vec<Sub>,
    groups: &'a mut Vec<Group>,
}

impl Entries<'_> {
    /// Adds or replaces the session's subscription; true if it replaced one.
    fn insert(self, group: Option<&str>, sub: Sub) -> bool {
        let list = match group {
            None => self.subs,
            Some(name) => {
                let i = match self.groups.iter().position(|g| &*g.name == name) {
                    Some(i) => i,
                    None => {
                        self.groups.push(Group {
                            name: name.into(),
                            members: Vec::new(),
                            next: 0,
                        });
                        self.groups.len() - 1
                    }
                };
                &mut self.groups[i].members
            }
        };
        match list.iter_mut().find(|s| s.session == sub.session) {
            Some(existing) => {
                *existing = sub;
                true
            }
            None => {
                list.push(sub);
                false
            }
        }
    }

    fn remove(self, group: Option<&str>, session: SessionKey) -> bool {
        match group {
            None => {
                let before = self.subs.len();
                self.subs.retain(|s| s.session != session);
                self.subs.len() != before
            }
            Some(name) => {
                let Some(i) = self.groups.iter().position(|g| &*g.name == name) else {
                    return false;
                };
                let g = &mut self.groups[i];
                let before = g.members.len();
                g.members.retain(|s| s.session != session);
                let removed = g.members.len() != before;
                if g.members.is_empty() {
                    self.groups.swap_remove(i);
                }
                removed
            }
        }
    }

    /// Every plain subscription, and one member of each group: the next in turn that
    /// `available` accepts, else the next in turn.
    fn collect(self, out: &mut Vec<Matched>, available: &impl Fn(SessionKey) -> bool) {
        out.extend(self.subs.iter().map(|&sub| Matched { sub, shared: false }));
        for group in self.groups.iter_mut() {
            let n = group.members.len();
            let start = group.next % n;
            let pick = (0..n)
                .map(|i| (start + i) % n)
                .find(|&i| available(group.members[i].session))
                .unwrap_or(start);
            group.next = pick + 1;
            out.push(Matched {
                sub: group.members[pick],
                shared: true,
            });
        }
    }
}

/// What few nodes have: `#` subscriptions and shared groups.
#[derive(Debug, Default)]
struct Rare {
    /// Filters that end with `#` after this node (`a/#` at the node of `a`).
    multi: Vec<Sub>,
    exact_groups: Vec<Group>,
    multi_groups: Vec<Group>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.multi.is_empty() && self.exact_groups.is_empty() && self.multi_groups.is_empty()
    }
}

/// One level of the tree. Small (most nodes are leaves with one subscription): what only
/// some nodes need is boxed.
#[derive(Debug, Default)]
struct Node {
    /// Boxed: an empty map is 48 bytes, in every leaf.
    #[allow(clippy::box_collection)]
    children: Option<Box<HashMap<Box<str>, Node>>>,
    /// The `+` level.
    plus: Option<Box<Node>>,
    /// Plain filters that end at this node.
    exact: Vec<Sub>,
    rare: Option<Box<Rare>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.as_ref().is_none_or(|c| c.is_empty())
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.rare.as_ref().is_none_or(|r| r.is_empty())
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// The filters that end here, to change them.
    fn exact_entries(&mut self) -> Entries<'_> {
        let rare = self.rare.get_or_insert_with(Default::default);
        Entries {
            subs: &mut self.exact,
            groups: &mut rare.exact_groups,
        }
    }

    fn multi_entries(&mut self) -> Entries<'_> {
        let rare = self.rare();
        Entries {
            subs: &mut rare.multi,
            groups: &mut rare.multi_groups,
        }
    }

    /// Gives back the rare part once it is empty.
    fn tidy(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
        if self.children.as_ref().is_some_and(|c| c.is_empty()) {
            self.children = None;
        }
    }

    fn child_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.children.as_mut()?.get_mut(name)
    }
}

/// A subscription a topic matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    pub sub: Sub,
    /// Through a shared subscription (never retained messages, no No Local).
    pub shared: bool,
}

#[derive(Debug, Default)]
pub struct Router {
    root: Node,
    count: usize,
}

impl Router {
    /// Subscriptions in the tree.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds the session's subscription to `filter` (replacing its earlier one to the same
    /// filter); true if it replaced one.
    pub fn insert(&mut self, filter: Filter<'_>, sub: Sub) -> bool {
        let mut node = &mut self.root;
        let mut levels = filter.levels.split('/');
        let multi = loop {
            let Some(level) = levels.next() else {
                break false;
            };
            match level {
                "#" => break true,
                "+" => node = node.plus.get_or_insert_with(Default::default),
                name => {
                    node = node
                        .children
                        .get_or_insert_with(Default::default)
                        .entry(name.into())
                        .or_default()
                }
            }
        };
        let replaced = match (multi, filter.group) {
            (false, None) => Entries {
                subs: &mut node.exact,
                groups: &mut Vec::new(),
            }
            .insert(None, sub),
            (false, group) => node.exact_entries().insert(group, sub),
            (true, group) => node.multi_entries().insert(group, sub),
        };
        node.tidy();
        if !replaced {
            self.count += 1;
        }
        replaced
    }

    /// Removes the session's subscription to `filter`; true if there was one.
    pub fn remove(&mut self, filter: Filter<'_>, session: SessionKey) -> bool {
        let removed = remove_at(&mut self.root, filter.levels, filter.group, session);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Every subscription `topic` matches, appended to `out` (a session may appear more
    /// than once: one entry per matching subscription). `available` steers a shared
    /// group's message to a member that can take it now.
    pub fn matches(
        &mut self,
        topic: &str,
        out: &mut Vec<Matched>,
        available: impl Fn(SessionKey) -> bool,
    ) {
        let dollar = topic.starts_with('$');
        walk(&mut self.root, Some(topic), true, dollar, out, &available);
    }
}

/// Collects what the node and its descendants give `rest` of the topic (None: every
/// level was consumed). Recursion depth is bounded by the tree's depth.
fn walk(
    node: &mut Node,
    rest: Option<&str>,
    at_root: bool,
    dollar: bool,
    out: &mut Vec<Matched>,
    available: &impl Fn(SessionKey) -> bool,
) {
    // [MQTT-4.7.2-1]: a wildcard in the first level does not match a `$` topic.
    let wildcards = !(at_root && dollar);
    if let (true, Some(rare)) = (wildcards, node.rare.as_deref_mut()) {
        Entries {
            subs: &mut rare.multi,
            groups: &mut rare.multi_groups,
        }
        .collect(out, available);
    }
    let Some(rest) = rest else {
        out.extend(node.exact.iter().map(|&sub| Matched { sub, shared: false }));
        if let Some(rare) = node.rare.as_deref_mut() {
            Entries {
                subs: &mut Vec::new(),
                groups: &mut rare.exact_groups,
            }
            .collect(out, available);
        }
        return;
    };
    let (level, next) = match rest.split_once('/') {
        Some((level, next)) => (level, Some(next)),
        None => (rest, None),
    };
    if let Some(child) = node.child_mut(level) {
        walk(child, next, false, dollar, out, available);
    }
    if wildcards {
        if let Some(plus) = node.plus.as_deref_mut() {
            walk(plus, next, false, dollar, out, available);
        }
    }
}

fn remove_at(node: &mut Node, levels: &str, group: Option<&str>, session: SessionKey) -> bool {
    let (level, rest) = match levels.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (levels, None),
    };
    let removed = match (level, rest) {
        ("#", _) => node.multi_entries().remove(group, session),
        ("+", rest) => {
            let Some(plus) = node.plus.as_deref_mut() else {
                return false;
            };
            let removed = match rest {
                Some(rest) => remove_at(plus, rest, group, session),
                None => remove_here(plus, group, session),
            };
            if plus.is_empty() {
                node.plus = None;
            }
            removed
        }
        (name, rest) => {
            let Some(child) = node.child_mut(name) else {
                return false;
            };
            let removed = match rest {
                Some(rest) => remove_at(child, rest, group, session),
                None => remove_here(child, group, session),
            };
            if child.is_empty() {
                if let Some(children) = node.children.as_mut() {
                    children.remove(name);
                }
            }
            removed
        }
    };
    node.tidy();
    removed
}

/// Removes a filter that ends at `node`.
fn remove_here(node: &mut Node, group: Option<&str>, session: SessionKey) -> bool {
    let removed = match group {
        None => Entries {
            subs: &mut node.exact,
            groups: &mut Vec::new(),
        }
        .remove(None, session),
        group => node.exact_entries().remove(group, session),
    };
    node.tidy();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> SessionKey {
        SessionKey::new(i, 0)
    }

    fn sub(i: u32) -> Sub {
        Sub {
            session: key(i),
            options: SubOptions::default(),
            id: 0,
        }
    }

    fn matched(router: &mut Router, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        router.matches(topic, &mut out, |_| true);
        let mut ids: Vec<u32> = out.iter().map(|m| m.sub.session.index()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn wildcards_match_as_mqtt_says() {
        let mut r = Router::default();
        for (i, f) in ["a/b", "a/+", "a/#", "#", "+/+", "+", "a/+/c", "/a", "+/#"]
            .iter()
            .enumerate()
        {
            r.insert(Filter::parse(f).unwrap(), sub(i as u32));
        }
        assert_eq!(matched(&mut r, "a/b"), vec![0, 1, 2, 3, 4, 8]);
        assert_eq!(matched(&mut r, "a"), vec![2, 3, 5, 8]);
        assert_eq!(matched(&mut r, "a/x/c"), vec![2, 3, 6, 8]);
        assert_eq!(matched(&mut r, "/a"), vec![3, 4, 7, 8]);
        // `$` topics: no first-level wildcard.
        assert_eq!(matched(&mut r, "$SYS/x"), Vec::<u32>::new());
        r.insert(Filter::parse("$SYS/#").unwrap(), sub(9));
        assert_eq!(matched(&mut r, "$SYS/x"), vec![9]);
        assert_eq!(r.len(), 10);
        assert!(r.remove(Filter::parse("a/#").unwrap(), key(2)));
        assert!(!r.remove(Filter::parse("a/#").unwrap(), key(2)));
        assert_eq!(matched(&mut r, "a"), vec![3, 5, 8]);
        for (i, f) in [
            "a/b", "a/+", "#", "+/+", "+", "a/+/c", "/a", "+/#", "$SYS/#",
        ]
        .iter()
        .enumerate()
        {
            let index = if i >= 2 { i as u32 + 1 } else { i as u32 };
            assert!(r.remove(Filter::parse(f).unwrap(), key(index)), "{f}");
        }
        assert!(r.is_empty() && r.root.is_empty());
    }

    #[test]
    fn a_shared_group_gives_each_message_to_one_available_member() {
        let mut r = Router::default();
        let f = Filter::parse("$share/g/t/+").unwrap();
        for i in 0..3 {
            r.insert(f, sub(i));
        }
        r.insert(Filter::parse("t/x").unwrap(), sub(9));
        let mut picks = Vec::new();
        for _ in 0..6 {
            let mut out = Vec::new();
            r.matches("t/x", &mut out, |k| k.index() != 1);
            assert_eq!(out.len(), 2);
            picks.push(out.iter().find(|m| m.shared).unwrap().sub.session.index());
        }
        assert_eq!(picks, vec![0, 2, 0, 2, 0, 2]);
    }

    #[test]
    fn filters_are_checked() {
        for bad in [
            "",
            "a/#/b",
            "a+",
            "#a",
            "$share/g",
            "$share//t",
            "$share/g+/t",
            "$share/g/",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
        let deep = vec!["a"; 129].join("/");
        assert!(Filter::parse(&deep).is_err());
        assert_eq!(
            Filter::parse("$share/g/a/#").unwrap(),
            Filter {
                group: Some("g"),
                levels: "a/#"
            }
        );
    }
}
