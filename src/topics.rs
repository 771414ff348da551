//! MQTT topic names and filters: validity, matching, overlap, and `{gateway_id}`.
//!
//! Rules are MQTT 3.1.1's (section 4.7): `+` matches exactly one level, `#` matches any
//! number of levels including none (so `a/#` matches `a`), and a filter that starts with
//! a wildcard does not match a topic that starts with `$`.

use std::borrow::Cow;

/// Longest topic or filter MQTT can carry (a UTF-8 string with a 16-bit length).
const MAX_LEN: usize = 65_535;

/// The placeholder replaced by `gateway.id` in every topic, prefix and client id.
pub const GATEWAY_ID_PLACEHOLDER: &str = "{gateway_id}";

/// Checks a topic name a message can be published to.
pub fn valid_topic(topic: &str) -> Result<(), String> {
    common_checks(topic)?;
    if topic.contains(['+', '#']) {
        return Err("contains a wildcard ('+' or '#'), which only filters may use".into());
    }
    Ok(())
}

/// Checks a topic filter a client can subscribe to.
pub fn valid_filter(filter: &str) -> Result<(), String> {
    common_checks(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if !last => return Err("'#' is allowed only as the last level".into()),
            "#" | "+" => {}
            _ if level.contains(['+', '#']) => {
                return Err(format!(
                    "level {level:?} mixes a wildcard with other characters; \
                     '+' and '#' must stand alone between '/'"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

fn common_checks(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.contains('\0') {
        return Err("contains a NUL character".into());
    }
    if s.len() > MAX_LEN {
        return Err(format!("is {} bytes long; MQTT allows {MAX_LEN}", s.len()));
    }
    Ok(())
}

/// Whether `filter` matches `topic`. Both are assumed valid. Runs for every local
/// message against every uplink rule, so it does not allocate.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            _ => return false,
        }
    }
}

/// Like [`matches`], and collects what each wildcard of `filter` matched, in order: a `+`
/// its level, a `#` the rest of the topic (empty when it matched no level).
pub fn captures<'t>(filter: &str, topic: &'t str, out: &mut Vec<&'t str>) -> bool {
    out.clear();
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    // What is left of the topic; None once its last level was taken.
    let mut rest = Some(topic);
    loop {
        let level = rest.map(|r| match r.split_once('/') {
            Some((level, more)) => (level, Some(more)),
            None => (r, None),
        });
        match (filter_levels.next(), level) {
            (Some("#"), _) => {
                out.push(rest.unwrap_or_default());
                return true;
            }
            (None, None) => return true,
            (Some("+"), Some((level, more))) => {
                out.push(level);
                rest = more;
            }
            (Some(f), Some((level, more))) if f == level => rest = more,
            _ => return false,
        }
    }
}

/// A topic to publish to, with `{N}` placeholders: `{1}` stands for what the first wildcard
/// of a filter matched (`warehouse/{1}/fan` from `warehouse/+/temp`). Braces around
/// anything but digits are plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// `{N}` as written (1-based).
    Capture(usize),
}

impl Template {
    pub fn parse(text: &str) -> Template {
        let mut pieces = Vec::new();
        let mut text_start = 0;
        let mut i = 0;
        while let Some(open) = text[i..].find('{').map(|o| i + o) {
            let digits = text[open + 1..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(text.len(), |end| open + 1 + end);
            let number = text[open + 1..digits].parse::<usize>().ok();
            match (number, text[digits..].starts_with('}')) {
                (Some(n), true) => {
                    if open > text_start {
                        pieces.push(Piece::Text(text[text_start..open].to_owned()));
                    }
                    pieces.push(Piece::Capture(n));
                    i = digits + 1;
                    text_start = i;
                }
                _ => i = open + 1,
            }
        }
        if text_start < text.len() {
            pieces.push(Piece::Text(text[text_start..].to_owned()));
        }
        Template(pieces)
    }

    /// The placeholder numbers as written, in order.
    pub fn placeholders(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().filter_map(|piece| match piece {
            Piece::Capture(n) => Some(*n),
            Piece::Text(_) => None,
        })
    }

    /// The topic for these captures (see [`captures`]); a placeholder without a capture
    /// stands for nothing.
    pub fn fill(&self, captures: &[&str]) -> String {
        let mut topic = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Text(text) => topic.push_str(text),
                Piece::Capture(n) => {
                    let capture = n.checked_sub(1).and_then(|i| captures.get(i));
                    topic.push_str(capture.copied().unwrap_or_default());
                }
            }
        }
        topic
    }

    /// A filter matching every topic this template can make from the topics `filter`
    /// matches, and possibly more: a level holding a placeholder becomes `+`, and from a
    /// placeholder standing for a `#` on, `#`.
    pub fn as_filter(&self, filter: &str) -> String {
        let multi_level: Vec<bool> = filter
            .split('/')
            .filter(|level| *level == "+" || *level == "#")
            .map(|level| level == "#")
            .collect();
        let mut levels = vec![(String::new(), false)];
        for piece in &self.0 {
            match piece {
                Piece::Text(text) => {
                    let mut parts = text.split('/');
                    if let (Some(first), Some(last)) = (parts.next(), levels.last_mut()) {
                        last.0.push_str(first);
                    }
                    levels.extend(parts.map(|part| (part.to_owned(), false)));
                }
                Piece::Capture(n) => {
                    let hash = n.checked_sub(1).and_then(|i| multi_level.get(i));
                    if hash == Some(&true) {
                        levels.pop();
                        let mut filter: Vec<String> = levels.into_iter().map(level_text).collect();
                        filter.push("#".to_owned());
                        return filter.join("/");
                    }
                    if let Some(last) = levels.last_mut() {
                        last.1 = true;
                    }
                }
            }
        }
        let filter: Vec<String> = levels.into_iter().map(level_text).collect();
        filter.join("/")
    }
}

fn level_text((text, wild): (String, bool)) -> String {
    if wild {
        "+".to_owned()
    } else {
        text
    }
}

/// Whether some topic is matched by both filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    prefixed_filter_overlaps("", a, b)
}

/// Whether a topic `prefix + t`, for some topic `t` matched by `filter`, can be matched
/// by `other`. This is how an uplink rule's cloud topics are compared with a cloud
/// subscription. The prefix is plain text: when it does not end with `/`, its last part
/// joins the first level of `t`.
pub fn prefixed_filter_overlaps(prefix: &str, filter: &str, other: &str) -> bool {
    let a = prefixed_levels(prefix, filter);
    let b = prefixed_levels("", other);
    !dollar_excluded(&a, &b) && !dollar_excluded(&b, &a) && levels_overlap(&a, &b)
}

/// Replaces every `{gateway_id}` in `s` with `id`.
pub fn substitute_gateway_id(s: &str, id: &str) -> String {
    s.replace(GATEWAY_ID_PLACEHOLDER, id)
}

/// One level of the set of topics a (prefixed) filter describes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level<'a> {
    Exact(Cow<'a, str>),
    /// Any level that begins with this text (a prefix glued to a `+` or `#`).
    StartsWith(&'a str),
    /// `+`
    Any,
    /// `#`: zero or more further levels.
    Rest,
}

fn level(text: &str) -> Level<'_> {
    match text {
        "+" => Level::Any,
        "#" => Level::Rest,
        _ => Level::Exact(Cow::Borrowed(text)),
    }
}

fn prefixed_levels<'a>(prefix: &'a str, filter: &'a str) -> Vec<Level<'a>> {
    let (head, glue) = match prefix.rsplit_once('/') {
        Some((head, glue)) => (Some(head), glue),
        None => (None, prefix),
    };
    let mut levels: Vec<Level<'a>> = head
        .into_iter()
        .flat_map(|h| h.split('/'))
        .map(level)
        .collect();
    let mut filter_levels = filter.split('/');
    let first = filter_levels.next().unwrap_or_default();
    match (glue, first) {
        ("", _) => levels.push(level(first)),
        (_, "+") => levels.push(Level::StartsWith(glue)),
        (_, "#") => levels.extend([Level::StartsWith(glue), Level::Rest]),
        (_, _) => levels.push(Level::Exact(Cow::Owned(format!("{glue}{first}")))),
    }
    levels.extend(filter_levels.map(level));
    levels
}

/// A leading wildcard in `a` never matches the `$`-topics that `b` is limited to.
fn dollar_excluded(a: &[Level], b: &[Level]) -> bool {
    let a_wild = matches!(a.first(), Some(Level::Any | Level::Rest));
    let b_dollar = match b.first() {
        Some(Level::Exact(text)) => text.starts_with('$'),
        Some(Level::StartsWith(text)) => text.starts_with('$'),
        _ => false,
    };
    a_wild && b_dollar
}

fn levels_overlap(a: &[Level], b: &[Level]) -> bool {
    match (a.split_first(), b.split_first()) {
        (Some((Level::Rest, _)), _) | (_, Some((Level::Rest, _))) => true,
        (None, None) => true,
        (Some((x, a_rest)), Some((y, b_rest))) => {
            level_overlaps(x, y) && levels_overlap(a_rest, b_rest)
        }
        _ => false,
    }
}

fn level_overlaps(x: &Level, y: &Level) -> bool {
    match (x, y) {
        (Level::Any | Level::Rest, _) | (_, Level::Any | Level::Rest) => true,
        (Level::Exact(a), Level::Exact(b)) => a == b,
        (Level::Exact(text), Level::StartsWith(start))
        | (Level::StartsWith(start), Level::Exact(text)) => text.starts_with(start),
        (Level::StartsWith(a), Level::StartsWith(b)) => a.starts_with(b) || b.starts_with(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_to_publish_to() {
        assert_eq!(valid_topic("warehouse/zone1/temp"), Ok(()));
        assert_eq!(valid_topic("/leading/and/trailing/"), Ok(()));
        assert_eq!(valid_topic("$SYS/x"), Ok(()));
        assert_eq!(valid_topic(""), Err("is empty".into()));
        assert!(valid_topic("a/+/b").unwrap_err().contains("wildcard"));
        assert!(valid_topic("a/#").unwrap_err().contains("wildcard"));
        assert!(valid_topic("a\0b").unwrap_err().contains("NUL"));
        assert_eq!(valid_topic(&"x".repeat(MAX_LEN)), Ok(()));
        assert!(valid_topic(&"x".repeat(MAX_LEN + 1))
            .unwrap_err()
            .contains("65536 bytes"));
    }

    #[test]
    fn filters() {
        for ok in [
            "#", "+", "a/#", "a/+/b", "+/+", "/#", "a//b", "$SYS/#", "a/b",
        ] {
            assert_eq!(valid_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/#/b", "#/a", "a#", "a/b#", "a+/b", "a/+b", "a\0"] {
            assert!(valid_filter(bad).is_err(), "{bad}");
        }
        assert!(valid_filter(&"a".repeat(MAX_LEN + 1)).is_err());
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("+", "a", true),
            ("+", "a/b", false),
            ("+", "/a", false),
            ("+/+", "/a", true),
            ("a/+", "a/", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("#", "a/b/c", true),
            ("#", "/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("a/b/#", "a", false),
            ("+/#", "a", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/+", "a/$x", true),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn overlap_of_two_filters() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "+/b", true),
            ("a/#", "a", true),
            ("a", "a/#", true),
            ("a/#", "b/#", false),
            ("#", "x/y/z", true),
            ("+", "a/b", false),
            ("+/+", "a/#", true),
            ("a/+/c", "a/b/+/d", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/#", false),
            ("#", "+", true),
            ("$SYS/#", "$SYS/+", true),
        ];
        for (a, b, expected) in cases {
            assert_eq!(filters_overlap(a, b), expected, "{a} vs {b}");
            assert_eq!(filters_overlap(b, a), expected, "{b} vs {a}");
        }
    }

    #[test]
    fn overlap_with_a_prefix() {
        let cases = [
            ("fleet/gw/", "warehouse/#", "fleet/gw/cmd/#", false),
            ("fleet/gw/", "#", "fleet/gw/cmd/#", true),
            ("fleet/gw/", "cmd/+", "fleet/+/cmd/x", true),
            ("fleet/gw/", "warehouse/#", "fleet/+/warehouse/t", true),
            ("", "a/#", "a/b", true),
            // A prefix without a trailing '/' joins the first level of the local topic.
            ("fleet/gw", "+/t", "fleet/gw1/t", true),
            ("fleet/gw", "+/t", "fleet/gx/t", false),
            ("fleet/gw", "#", "fleet/gwx/y", true),
            ("fleet/gw", "#", "fleet/other", false),
            ("fleet/gw", "1/t", "fleet/gw1/t", true),
            ("fleet/gw", "1/t", "fleet/gw/t", false),
            ("up", "#", "+", true),
            ("up", "+", "upx", true),
            ("$up/", "#", "#", false),
            ("$up/", "#", "$up/#", true),
        ];
        for (prefix, filter, other, expected) in cases {
            assert_eq!(
                prefixed_filter_overlaps(prefix, filter, other),
                expected,
                "{prefix} + {filter} vs {other}"
            );
        }
    }

    #[test]
    fn captures_of_wildcards() {
        let cases: [(&str, &str, Option<&[&str]>); 9] = [
            ("warehouse/+/temp", "warehouse/zone1/temp", Some(&["zone1"])),
            ("warehouse/+/temp", "warehouse/zone1/hum", None),
            ("+/+", "a/b", Some(&["a", "b"])),
            ("a/+", "a/", Some(&[""])),
            ("site/#", "site/a/b/c", Some(&["a/b/c"])),
            ("site/#", "site", Some(&[""])),
            ("#", "x/y", Some(&["x/y"])),
            ("+/x/#", "a/x", Some(&["a", ""])),
            ("#", "$SYS/x", None),
        ];
        let mut out = Vec::new();
        for (filter, topic, expected) in cases {
            let matched = captures(filter, topic, &mut out);
            assert_eq!(matched, matches(filter, topic), "{filter} vs {topic}");
            assert_eq!(
                expected,
                matched.then_some(out.as_slice()),
                "{filter} vs {topic}"
            );
        }
    }

    #[test]
    fn templates_fill_and_describe_their_topics() {
        let t = Template::parse("warehouse/{1}/fan/command");
        assert_eq!(t.placeholders().collect::<Vec<_>>(), [1]);
        assert_eq!(t.fill(&["zone1"]), "warehouse/zone1/fan/command");
        assert_eq!(t.as_filter("warehouse/+/temp"), "warehouse/+/fan/command");
        let t = Template::parse("alarm/{2}-{1}/x{0}{a}{");
        assert_eq!(t.placeholders().collect::<Vec<_>>(), [2, 1, 0]);
        assert_eq!(t.fill(&["a", "b"]), "alarm/b-a/x{a}{");
        assert_eq!(t.as_filter("+/+"), "alarm/+/+");
        let t = Template::parse("out/{1}/x");
        assert_eq!(t.as_filter("site/#"), "out/#");
        assert_eq!(t.fill(&["a/b"]), "out/a/b/x");
        let plain = Template::parse("a/b");
        assert_eq!(plain.placeholders().count(), 0);
        assert_eq!(plain.as_filter("#"), "a/b");
    }

    #[test]
    fn gateway_id_substitution() {
        assert_eq!(
            substitute_gateway_id("fleet/{gateway_id}/status", "gw-7"),
            "fleet/gw-7/status"
        );
        assert_eq!(
            substitute_gateway_id("{gateway_id}-{gateway_id}", "g"),
            "g-g"
        );
        assert_eq!(substitute_gateway_id("plain", "g"), "plain");
    }
}
