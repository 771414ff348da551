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
